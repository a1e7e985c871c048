#!/usr/bin/env bash
# The six studies on the default organism (stage 2) and on organism_frozen (stage 1), at the four
# SAE layers, as reported in experiments/organism/README.md ("Six studies on stage 1 and stage 2").
# Usage: bash experiments/organism/six_studies.sh [organism|organism_frozen ...] (default: both)
# Each sweep extracts activations once (paths.cache_preset_layers) and writes summary.parquet and
# report.md under outputs/six_studies/<model>/<study>/.
set -euo pipefail
models="${*:-organism organism_frozen}"
for model in $models; do
  out=outputs/six_studies/$model
  sweep() { python -m xmodal.run -m "model=$model" "hydra.sweep.dir=$out/$1" "${@:2}"; }
  sweep overlap experiment=overlap layer=5,9,12,15
  sweep mds experiment=mds layer=5,9,12,15
  sweep probe experiment=probe layer=5,9,12,15 experiment.n_permutations=30 "experiment.attributes=[modality]"
  sweep shift experiment=shift layer=5,9,12,15
  sweep das_alignment experiment=das_colour_alignment "dataset.categories=[colour]" layer=9
  sweep steering experiment=steering experiment.concept=red experiment.mode=add "experiment.images=[]" experiment.n_images=24 layer=5,9,12,15
done
# Text-vector DAS synthesis on the default at the layers its nine-colour check picked (largest gap: 2;
# largest surviving Bonferroni: 6); stage 1's layers 7 and 8 are in experiments/das/README.md.
if [[ " $models " == *" organism "* ]]; then
  python -m xmodal.run -m model=organism hydra.sweep.dir=outputs/six_studies/organism/das_text experiment=das layer=2,6 \
    "experiment.concepts=[red,orange,yellow,green,blue,purple,pink,brown,black]" experiment.concepts_per_pass=9 \
    experiment.steps=300 experiment.batch_size=4 dataset.images_per_concept=16 "experiment.alignment_concepts=[]"
fi
