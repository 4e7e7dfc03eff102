"""Host memory: page-aligned (pinned, where CUDA is present) buffers and the budgeted staging pool."""
