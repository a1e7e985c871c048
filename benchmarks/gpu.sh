#!/usr/bin/env bash
# Every GPU figure in one run, on one GPU node, in under 13 minutes, with no download: random
# weights in the real configs of Gemma 3 4B, 12B and 27B (bf16, 896x896 images).
#   bash benchmarks/gpu.sh            -> benchmarks/results/gpu.json (the figures benchmarks/README.md quotes)
# The packages the node lacks (hydra, sae-lens, ...) install from benchmarks/wheels/ when it is there:
#   pip download -d benchmarks/wheels hydra-core sae-lens hydra-submitit-launcher wandb ...   (on a machine with the index)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import hydra, sae_lens" 2>/dev/null; then
  python -m pip install -q --no-index --find-links benchmarks/wheels -e .
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU; on a CPU run: python benchmarks/suite.py"
print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
out=benchmarks/results
mkdir -p "$out/gpu_parts"
common="device=cuda images_per_concept=16 batch_size=32 naive_images=8 sae_width=16384 sae_tokens=262144"
# 4B: every benchmark; the issue's targets are images/s at layer 9 and DAS s/step at layer 10, batch 8.
timeout 240 python benchmarks/suite.py shape=gemma3_4b_random layer=9 das_layer=10 das_concepts=1 das_copies=8 $common \
  out=$out/gpu_parts/gemma3_4b.json
# 12B and 27B: extraction, SAE encode and the store (DAS and generation scale like 4B's).
timeout 120 python benchmarks/suite.py shape=gemma3_12b_random layer=24 skip=[das,steering_generation] $common \
  out=$out/gpu_parts/gemma3_12b.json
timeout 120 python benchmarks/suite.py shape=gemma3_27b_random layer=31 skip=[das,steering_generation] $common \
  out=$out/gpu_parts/gemma3_27b.json
# The whole study pass (forward to layer 9, 16k TopK SAE encode on the device, pooled and sparse codes
# written shard by shard) at 4B shape: images/s and peak GPU memory at two dataset sizes.
timeout 300 python benchmarks/scale.py model=gemma3_4b_random device=cuda sizes=[240,960] studies=[overlap] sae=topk \
  hidden_size=2560 image_size=896 layer=9 batch_size=32 n_permutations=100 out=$out/gpu_parts/study_pass_4b.json
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted((out / "gpu_parts").glob("*.json"))}
(out / "gpu.json.tmp").write_text(json.dumps(merged, indent=1))
(out / "gpu.json.tmp").replace(out / "gpu.json")
print(f"wrote {out / 'gpu.json'}: {', '.join(merged)}")
PY
