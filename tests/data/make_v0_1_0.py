"""Wrote tests/data/v0.1.0: a small checkpoint made by asyncckpt 0.1.0 and the same state as torch.save.

Run with release 0.1.0 installed; kept to document how the data was made.
"""

import os
import shutil
from collections import OrderedDict

import anyio
import torch

import asyncckpt

torch.manual_seed(1234)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(2):
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
base = torch.arange(64, dtype=torch.float32)
state = {
    "model": model.state_dict(),
    "optimizer": opt.state_dict(),
    "tied": [base, base],                      # one tensor referenced twice
    "views": (base[2:10], base.view(8, 8).t()),  # overlapping views of one storage
    "dtypes": {str(d): (torch.arange(12) % 7).to(d) for d in
               (torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8, torch.bool,
                torch.int64, torch.complex64)},
    "empty": torch.empty(0, 3),
    "scalar": torch.tensor(3.5),
    "meta": {"step": 1200, "lr": 1e-3, "nan": float("nan"), "inf": float("-inf"), 7: "int key",
             (1, 2): "tuple key", "none": None, "flag": True, "name": "ref"},
    "ordered": OrderedDict([("b", 1), ("a", [1, 2, {"x": 3}])]),
    "a_set": {1, 2, 3},                        # pickled (weights-only loadable)
}
out = "tests/data/v0.1.0"
shutil.rmtree(out, ignore_errors=True)
async def main():
    async with asyncckpt.CheckpointEngine(chunk_bytes=4096, shard_bytes=2048, host_memory_budget=1 << 20) as e:
        r = await (await e.save(state, out + "/checkpoint"))
        print(r)
anyio.run(main)
torch.save(state, out + "/expected.pt")
print(os.listdir(out + "/checkpoint"), asyncckpt.__version__)
