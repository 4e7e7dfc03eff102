"""Library functions behind the command line: conversion, inspection, verification, progress, benchmarking."""
