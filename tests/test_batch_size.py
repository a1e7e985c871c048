"""positions.batch_size=auto: the size found is kept per workload and sequence length."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from xmodal.activations import batch_size as auto
from xmodal.activations.batch_size import Workload, resolve_batch_size

# Pretend memory: tokens a batch may hold per workload, so each workload has its own largest batch.
BUDGET = {Workload.EARLY_EXIT: 150, Workload.GENERATE: 300, Workload.FORWARD_BACKWARD: 120}


@pytest.fixture
def pretend_gpu(tiny, monkeypatch):
    """The tiny model as if on a GPU whose memory runs out at BUDGET tokens per workload."""
    on_gpu = copy.copy(tiny)
    on_gpu.device = torch.device("cuda")
    runs: list[tuple[Workload, int, int]] = []

    def workload(kind):
        def run(adapter, inputs, layers, max_new_tokens):
            n, length = inputs["input_ids"].shape
            tokens = length + (max_new_tokens if kind == Workload.GENERATE else 0)  # only generation makes more
            runs.append((kind, n, tokens))
            if n * tokens > BUDGET[kind]:
                raise torch.cuda.OutOfMemoryError("pretend")

        return run

    monkeypatch.setattr(auto, "_WORKLOADS", {kind: workload(kind) for kind in Workload})
    monkeypatch.setattr(auto, "_found", {})
    monkeypatch.setattr(auto, "_probes", {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return on_gpu, runs


def test_each_workload_and_sequence_length_gets_its_own_probe(pretend_gpu, synthetic, positions):
    adapter, runs = pretend_gpu
    positions = replace(positions, batch_size="auto")
    text_only = replace(synthetic, images=[], text_only=True)
    sizes = {kind: resolve_batch_size(adapter, "auto", [1], text_only, positions, kind, max_new_tokens=20) for kind in Workload}
    length = runs[0][2]
    for kind, size in sizes.items():  # the largest batch that fits, capped at the dataset's 12 concepts
        extra = 20 if kind == Workload.GENERATE else 0
        assert size == min(12, BUDGET[kind] // (length + extra)), kind
    assert sizes[Workload.GENERATE] < sizes[Workload.FORWARD_BACKWARD] < sizes[Workload.EARLY_EXIT]
    probed = len(runs)
    assert resolve_batch_size(adapter, "auto", [1], text_only, positions) == sizes[Workload.EARLY_EXIT]
    assert len(runs) == probed, "a size found for the same workload and length is reused"

    longer = replace(positions, text_prompt="Here is a much longer prompt, many tokens long, that names {concept} in the end")
    longer_size = resolve_batch_size(adapter, "auto", [1], text_only, longer)
    assert len(runs) > probed and runs[-1][2] > length, "longer texts are probed again"
    assert longer_size <= sizes[Workload.EARLY_EXIT]


@pytest.mark.parametrize("modality", ["text", "image"])
def test_the_probed_workloads_run_on_the_model(tiny, synthetic, positions, modality):
    dataset = synthetic if modality == "image" else replace(synthetic, images=[], text_only=True)
    probe = auto._image_probe(tiny, dataset, positions) if modality == "image" else auto._text_probe(tiny, dataset, positions)
    batch = {k: v.expand(2, *v.shape[1:]) for k, v in probe.items()}
    for kind, run in auto._WORKLOADS.items():
        run(tiny, batch, [1], 3)  # each workload's real passes, at batch 2 (a GPU's OOM is what resolve_batch_size probes for)
