"""The Experiment interface: one ``run(ctx)`` that reads activations and writes results.

Each study lives in its own folder, ``xmodal/experiments/<study>/``: ``config.py`` holds
its config dataclass and ``experiment.py`` its Experiment class, whose ``run()`` calls one
method per step of the method its docstring numbers.

The run context hands an experiment everything it needs already validated: the
model adapter (weights still unloaded), the feature space (SAE or raw), the
dataset, the layer, the activation cache and the result writer. An experiment
returns its flat metrics; ``xmodal.run`` writes result.json after it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import pandas as pd

from xmodal.activations.batch_size import resolve_batch_size
from xmodal.activations.cache import ActivationCache, get_activations, get_readouts
from xmodal.activations.codes import ConceptCodes, codes_from_readout, codes_plan, concept_codes
from xmodal.activations.extract import LayerActivations
from xmodal.activations.readout import LayerReadout
from xmodal.config import ExperimentConfig, PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import ConfigError, DatasetError
from xmodal.models.base import ModelAdapter
from xmodal.reporting import figures
from xmodal.reporting.loggers import NullLogger
from xmodal.reporting.results import ResultWriter
from xmodal.saes.loading import FeatureSpace


@dataclass
class RunContext:
    model: ModelAdapter
    features: FeatureSpace
    dataset: ConceptDataset
    layer: int
    seed: int
    positions: PositionsConfig
    cache: ActivationCache | None
    writer: ResultWriter
    logger: NullLogger = field(default_factory=NullLogger)
    timings_s: dict[str, float] = field(default_factory=dict)
    progress: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)  # words a study records in result.json beside its metrics (which are numbers)
    cache_also_layers: Sequence[int] = ()  # extracted and cached alongside this job's layer (paths.cache_preset_layers)

    @property
    def batch_size(self) -> int:
        """positions.batch_size, with `auto` resolved for this model, layer and dataset."""
        return resolve_batch_size(self.model, self.positions.batch_size, [self.layer], self.dataset, self.positions)

    def verdict(self, name: str, passed: bool, bar: str, **evidence: float) -> None:
        """One of a plan's success bars, met or not, with what decided it: result.json's `verdicts`, and the log."""
        self.metadata.setdefault("verdicts", {})[name] = {"passed": bool(passed), "bar": bar, **{k: float(v) for k, v in evidence.items()}}
        logging.getLogger(__name__).info(
            "verdict %s: %s (%s; %s)", name, "met" if passed else "not met", bar, ", ".join(f"{k}={v:.4g}" for k, v in evidence.items())
        )

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[phase] = self.timings_s.get(phase, 0.0) + time.perf_counter() - start

    def activations(
        self,
        layers: Sequence[int] | None = None,
        positions: PositionsConfig | None = None,
        dataset: ConceptDataset | None = None,
        modalities: Sequence[str] = ("text", "image"),
        model: ModelAdapter | None = None,
        site: str = "resid_post",
    ) -> dict[int, LayerActivations | LayerReadout]:
        """Every token's resid_post (or `site`: mlp_out, attn_out, mlp_in), read from disk shard by shard; by
        default this job's model, layer, positions, dataset and both modalities. For studies that need the
        residuals themselves."""
        with self.timed("activations"):
            return get_activations(
                model or self.model,
                dataset or self.dataset,
                list(layers or [self.layer]),
                positions or self.positions,
                self.cache,
                self.progress,
                modalities,
                self.cache_also_layers if model is None else (),
                site,
            )

    def readout(
        self,
        positions: PositionsConfig | None = None,
        dataset: ConceptDataset | None = None,
        modalities: Sequence[str] = ("text", "image"),
        model: ModelAdapter | None = None,
        space: FeatureSpace | None = None,
        image_poolings: Sequence[tuple[str, int]] = (),
    ) -> LayerReadout:
        """This job's streaming pass at its layer: pooled codes of every item and, through an SAE, every
        token's non-zero codes. `space` replaces the job's feature space, `image_poolings` add poolings."""
        positions, model, space = positions or self.positions, model or self.model, space or self.features
        if not model.has_decoder:  # a dual encoder has one embedding per item: nothing to stream
            raise ConfigError(f"model {model.name!r} is a dual encoder: it has no image tokens to read out")
        plan = codes_plan(self.layer, space, positions, image_poolings)
        with self.timed("activations"):
            return get_readouts(model, dataset or self.dataset, [plan], positions, self.cache, self.progress, modalities)[self.layer]

    def codes(
        self,
        positions: PositionsConfig | None = None,
        dataset: ConceptDataset | None = None,
        modalities: Sequence[str] = ("text", "image"),
        model: ModelAdapter | None = None,
        space: FeatureSpace | None = None,
        image_pooling: tuple[str, int] | None = None,
    ) -> ConceptCodes:
        """Pooled feature codes at this job's layer (the streaming pass, or its cached readout)."""
        positions, model = positions or self.positions, model or self.model
        if not model.has_decoder:
            if image_pooling is not None:
                positions = dataclasses.replace(positions, image_pooling=image_pooling[0], top_n=image_pooling[1])
            acts = self.activations(None, positions, dataset, modalities, model)[self.layer]
            with self.timed("encode"):
                return concept_codes(acts, space or self.features, positions)
        readout = self.readout(positions, dataset, modalities, model, space, [image_pooling] if image_pooling else ())
        return codes_from_readout(readout, positions, image_pooling)

    def image_codes(self, poolings: Sequence[tuple[str, int]]) -> list[np.ndarray]:
        """(n_images, n_features) pooled image codes for each (how, top_n) in `poolings`, from one pass."""
        if not self.model.has_decoder:
            return [self.codes(modalities=("image",), image_pooling=tuple(p)).image for p in poolings]
        readout = self.readout(modalities=("image",), image_poolings=poolings)
        return [readout.image_pooled[tuple(p)].numpy() for p in poolings]

    def table(self, name: str, frame: pd.DataFrame) -> None:
        self.writer.table(name, frame)
        self.logger.log_table(name, frame)

    def figure(self, name: str, fig: Any) -> None:
        path = self.writer.figure(name, fig)
        self.logger.log_figure(name, path)

    def patch_heatmaps(self, name: str, features: Sequence[int], labels: Sequence[str], top_images: int = 4) -> None:
        """Figure `name`: per feature (row), its most activating images with its activation at every
        image token drawn over them (the token grid from the model's adapter)."""
        features = [int(f) for f in features]
        if not features or not self.model.has_decoder:  # a dual encoder's image is one embedding: no patches to map
            return
        readout = self.readout()
        if readout.image_tokens.grids is not None:  # ragged images: each at its own grid and aspect
            self.figure(name, figures.patch_heatmap_rows(self._ragged_heatmap_rows(readout, features, labels, top_images), self.layer))
            return
        maps = readout.image_tokens.feature_maps(features)
        grid = self.model.image_token_grid(readout.tokens_per_image)
        rows = []
        for feature_maps, label in zip(maps, labels):
            pooled = feature_maps.mean(axis=1)
            order = [i for i in np.argsort(-pooled, kind="stable")[:top_images] if pooled[i] > 0]
            # activation row i is dataset image i (extraction keeps the order; sources can repeat)
            rows.append(
                (
                    label,
                    [self.dataset.images[i].load() for i in order],
                    [feature_maps[i].reshape(grid) for i in order],
                    [readout.image_concepts[i] for i in order],
                )
            )
        self.figure(name, figures.patch_heatmap_rows(rows, self.layer))

    def _ragged_heatmap_rows(self, readout: Any, features: list[int], labels: Sequence[str], top_images: int) -> list[tuple]:
        tokens = readout.image_tokens
        rows = []
        for feature_maps, label in zip(tokens.feature_maps_per_image(features), labels):
            pooled = np.array([m.mean() if len(m) else 0.0 for m in feature_maps])
            order = [i for i in np.argsort(-pooled, kind="stable")[:top_images] if pooled[i] > 0]
            rows.append(
                (
                    label,
                    [self.dataset.images[i].load() for i in order],
                    [tokens.token_map(i, feature_maps[i]) for i in order],
                    [readout.image_concepts[i] for i in order],
                )
            )
        return rows

    def tensors(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
        self.writer.tensors(name, tensors, metadata)

    def export(self, name: str, payload: Any) -> None:
        self.writer.export(name, payload)

    def image(self, name: str, image: Any) -> None:
        path = self.writer.image(name, image)
        self.logger.log_figure(f"images/{name}", path)


class Experiment(ABC):
    """A study: subclasses implement run() and describe their method in its docstring.

    The class takes its config dataclass (beside it, in the study's config.py) as its one
    argument and checks it at once.
    """

    name: ClassVar[str]
    needs_images: ClassVar[bool] = True  # False where the study reads text only (shift, DAS's synthesis)
    needs_decoder: ClassVar[bool] = True  # False where embeddings suffice, so a dual encoder (CLIP) can run it

    def __init__(self, config: ExperimentConfig) -> None:
        config.validate()
        self.config = config

    def check_model(self, model: ModelAdapter) -> None:
        """A study that reads or steers a decoder cannot run on a dual encoder: say so before it loads."""
        if self.needs_decoder and not model.has_decoder:
            raise ConfigError(
                f"experiment={self.name} needs a decoder's residual stream, and model {model.name!r} is a dual encoder "
                "(CLIP/SigLIP: one embedding per text and per image); on it run experiment=mds, probe or overlap"
            )

    def check_dataset(self, dataset: ConceptDataset) -> None:
        """A study that compares modalities cannot run on a dataset without images: say so before any model loads."""
        if self.needs_images and not dataset.images:
            raise DatasetError(
                f"experiment={self.name} needs images, and dataset {dataset.name!r} has none (a text-only list); "
                "pick a dataset with images, e.g. dataset=organism_concepts"
            )

    @abstractmethod
    def run(self, ctx: RunContext) -> dict[str, float]:
        """Compute, write tables and figures through ctx, and return flat metrics."""
