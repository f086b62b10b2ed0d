"""The IterIS Merge node. Thin glue: the merge itself is `iteris_sd.app.pipeline.merge_loras`
over `ComfyBackend`."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import comfy_execution.utils
import torch
from comfy_api.latest import io, ui

from ..iteris_sd.app.pipeline import MergeReport, kohya_layers, merge_loras, merged_metadata
from ..iteris_sd.lora.layer import LoraFile
from ..iteris_sd.lora.read import file_sha256
from ..iteris_sd.merge.methods import METHODS
from ..iteris_sd.merge.options import MergeOptions
from ..iteris_sd.merge.ridge import AUTO
from ..iteris_sd.merge.solve import RIDGE_TARGETS
from ..iteris_sd.progress import MergeTimeEstimate
from .chart import convergence_image
from .comfy_backend import ComfyBackend, ComfyCalibration
from .lora_model import MergedLora, MergeExtras, merged_lora, named_layers
from .lora_types import LoraList


class MergeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IterIS_Merge",
            display_name="IterIS Merge LoRAs",
            category="loaders/IterIS",
            description="Merge several LoRAs into one with IterIS: each LoRA keeps doing on its own prompts what it did alone.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRAs were made for."),
                io.Clip.Input("clip", tooltip="The base model's text encoder; merged too when the LoRAs touch it."),
                LoraList.Input("loras", tooltip="The LoRAs to merge, from IterIS LoRA nodes."),
                io.Combo.Input("method", options=list(METHODS), default="iteris",
                               tooltip=" ".join(f"{m.name}: {m.summary}." for m in METHODS.values())),
                io.Int.Input("iterations", default=MergeOptions.iterations, min=0, max=50,
                             tooltip="IterIS re-solves after the first solve; the best measured iterate is kept, so more never hurts the calibration error."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="Output rank per layer; 0 keeps the exact merge (rank = sum of the input ranks), smaller truncates by SVD."),
                io.Combo.Input("sampler", options=comfy.samplers.KSampler.SAMPLERS, default=ComfyCalibration.sampler,
                               tooltip="Sampler of the calibration trajectories (one per prompt, with each LoRA alone)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=ComfyCalibration.scheduler,
                               tooltip="Scheduler of the calibration trajectories."),
                io.Int.Input("steps", default=ComfyCalibration.steps, min=1, max=100, tooltip="Steps of each calibration trajectory."),
                io.Int.Input("timesteps", default=ComfyCalibration.timesteps, min=1, max=100,
                             tooltip="Model calls captured per prompt, spread over the trajectory."),
                io.Int.Input("resolution", default=ComfyCalibration.resolution, min=0, max=2048, step=64,
                             tooltip="Image size of the calibration trajectories (the size the LoRAs were trained at); "
                                     "0: the model's native size (SD1.5 512, SD2 768, SDXL, SD3 and Flux 1024)."),
                io.Float.Input("cfg", default=ComfyCalibration.cfg, min=0.0, max=30.0, step=0.5,
                               tooltip="CFG scale of the calibration trajectories; 0: the family's (1.0 for Flux, "
                                       "which is guidance-distilled; 5.0 otherwise)."),
                io.Int.Input("calibration_seed", default=ComfyCalibration.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the calibration noise; the same inputs and seed give the same merge."),
                io.String.Input("negative_prompt", default=ComfyCalibration.negative_prompt, optional=True,
                                tooltip="Negative prompt of the calibration trajectories (the unconditional branch)."),
                io.Float.Input("damping", default=MergeOptions.damping, min=0.05, max=1.0, step=0.05, optional=True,
                               tooltip="IterIS step size; 1 is the paper's undamped iteration, which oscillates on diffusion models."),
                io.String.Input("regularization", default=str(MergeOptions.regularization), optional=True,
                                tooltip="Ridge strength, relative to each layer's input energy: 'auto' chooses it per layer by "
                                        "cross-validation over the calibration prompts (needs 2 or more prompts per LoRA, else "
                                        "over the timesteps); a number applies it to every layer: larger stays closer to the "
                                        "ridge target, smaller fits the calibration prompts more closely."),
                io.String.Input("memory_budget", default=MergeOptions.memory_budget, optional=True,
                                tooltip="Memory for the merge's statistics: 'auto' (free device memory less a margin) or a size such as 6GB."),
                io.Combo.Input("ridge_target", options=[*RIDGE_TARGETS, AUTO], default=MergeOptions.ridge_target, optional=True,
                               tooltip="What the ridge pulls the merge toward where the calibration says little: "
                                       "their 'sum' (each at full strength, as stacked), their 'average' (the paper's), or "
                                       "'auto' (with regularization 'auto': chosen per layer with the ridge)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the merged LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the merged LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The merged LoRA; save it with IterIS Save LoRA or apply it with Load LoRA Model."),
                io.String.Output(display_name="report", tooltip="Per-concept error of the merge and of every iteration."),
                io.Image.Output(display_name="chart", tooltip="Each concept's error per iteration."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, loras, method, iterations, rank, sampler, scheduler, steps, timesteps, resolution,
                cfg, calibration_seed, negative_prompt=ComfyCalibration.negative_prompt, damping=MergeOptions.damping,
                regularization=MergeOptions.regularization, memory_budget=MergeOptions.memory_budget,
                ridge_target=MergeOptions.ridge_target) -> io.NodeOutput:
        if not loras:
            raise ValueError("connect at least one IterIS LoRA node")
        settings = ComfyCalibration(sampler=sampler, scheduler=scheduler, steps=steps, timesteps=timesteps,
                                    resolution=resolution, cfg=cfg, negative_prompt=negative_prompt, seed=calibration_seed)
        backend = ComfyBackend(model, clip, [list(e.prompts) for e in loras], settings)
        files = [LoraFile(e.path, e.name, file_sha256(e.path), {}, e.strength) for e in loras]
        regularization = _number_or_auto(regularization, "regularization")
        options = MergeOptions(iterations=iterations, damping=damping, regularization=regularization, rank=rank or None,
                               seed=calibration_seed, memory_budget=memory_budget.strip() or MergeOptions.memory_budget,
                               ridge_target=ridge_target)
        estimate = MergeTimeEstimate(sum(len(e.prompts) for e in loras), steps, timesteps,
                                     iterations if method == "iteris" else 0)
        progress = NodeProgress(cls.hidden.unique_id, [e.name for e in loras], estimate)
        try:
            report = merge_loras(backend, files, [method], options, progress)
        finally:
            comfy.model_management.soft_empty_cache()
        layers = kohya_layers(backend, report.results[method].deltas)
        recipe = {"method": method, "iterations": iterations, "damping": damping, "regularization": regularization,
                  "ridge_target": ridge_target,
                  "rank": rank, "calibration": backend.settings.__dict__, "prompts": {e.name: list(e.prompts) for e in loras},
                  "calibration_error": dict(zip(report.concepts, report.results[method].calibration)),
                  "chosen_iteration": report.chosen_iteration}
        if report.ridges:
            recipe["ridge_chosen"] = report.ridge_summary()
        lora = _lora_model(backend, layers, merged_metadata(backend, layers, files, recipe))
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, _state_dict(named_layers(lora)), 1.0, 1.0)
        progress.send_done(report)
        # on the node a short per-LoRA table (the chart beside it has the iterations); the whole
        # report, memory plan included, on the report output
        return io.NodeOutput(model_out, clip_out, lora, report_text(report, backend.settings), convergence_image(report),
                             ui=ui.PreviewText(node_summary(report, backend.settings)))


def _number_or_auto(text, name: str) -> float | str:
    """A widget's 'auto' or number (older workflows saved a number)."""
    word = str(text).strip().lower()
    if word == AUTO:
        return AUTO
    try:
        return float(word)
    except ValueError:
        raise ValueError(f"{name}: expected 'auto' or a number such as 0.01, got {text!r}") from None


def _lora_model(backend: ComfyBackend, layers: dict, metadata: dict) -> MergedLora:
    unet, extras = {}, MergeExtras(metadata=metadata)
    for m, layer in layers.items():
        prefix = m[: -len(".weight")]
        (unet if m in backend.unet_keys else extras.text_encoder).update(_state_dict({prefix: layer}))
        extras.names[prefix] = backend.output_name(m)
    return merged_lora(unet, extras)


def _state_dict(layers: dict) -> dict:
    """{name: (up, down, alpha)} as ``name.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``."""
    out = {}
    for name, (up, down, alpha) in layers.items():
        out |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(float(alpha))}
    return out


def _calibration_line(report: MergeReport, c: ComfyCalibration) -> str:
    steps = f"{c.steps} step{'s' * (c.steps != 1)}"
    return f"calibrated at {c.resolution} px, {steps}, cfg {c.cfg:g}; merged in {report.seconds:.1f} s"


def report_text(report: MergeReport, calibration: ComfyCalibration) -> str:
    lines = [report.table()]
    if report.ridges:
        lines.append(report.ridge_summary())
    if report.plan is not None:
        lines.append(report.plan.describe())
    for rec in report.history:
        mark = "  <- kept" if rec.iteration == report.chosen_iteration else ""
        errors = "  ".join(f"{c} {e:.4f}" for c, e in zip(report.concepts, rec.errors))
        lines.append(f"iteration {rec.iteration}: {errors}{mark}")
    lines.append(_calibration_line(report, calibration))
    return "\n".join(lines)


def node_summary(report: MergeReport, calibration: ComfyCalibration) -> str:
    """What the node shows below its chart: each LoRA's calibration error, one line each, so the
    text is as tall for 5 iterations as for 1 and fits a narrow node, and the calibration used."""
    errors = report.results[report.method].calibration
    kept = f", iteration {report.chosen_iteration} kept" if report.history else ""
    width = max(len(c) for c in report.concepts)
    lines = [f"{report.method}: error per LoRA (0 = as the LoRA alone){kept}"]
    lines += [f"  {c.ljust(width)}  {e:.4f}" for c, e in zip(report.concepts, errors)]
    if report.ridges:
        lines.append(report.ridge_summary())
    lines.append(_calibration_line(report, calibration))
    return "\n".join(lines)


class NodeProgress:
    """The core's progress callback for a node: ProgressBar, live messages for the front end
    (event "iteris.progress", sent only to the browser that queued the prompt and tagged with
    its prompt id) with the estimated total time, and ComfyUI's interrupt check, so Cancel
    stops the merge."""

    def __init__(self, node_id, concepts: list[str], estimate: MergeTimeEstimate):
        self.node_id = node_id
        self.concepts = concepts
        self.estimate = estimate
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.history: list[list[float]] = []
        context = comfy_execution.utils.get_executing_context()
        self.prompt_id = context.prompt_id if context is not None else None
        self._send({"phase": "start", "done": 0, "total": 1, "history": []})

    def __call__(self, phase: str, done: int, total: int, detail: dict | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done, total)
        self.estimate.update(phase, done)
        if detail and "errors" in detail:
            self.history.append([float(e) for e in detail["errors"]])
        self._send({"phase": phase, "done": done, "total": total, "history": self.history})

    def send_done(self, report: MergeReport) -> None:
        self._send({"phase": "done", "done": 1, "total": 1, "seconds": report.seconds,
                    "history": [list(r.errors) for r in report.history], "chosen": report.chosen_iteration})

    def _send(self, data: dict) -> None:
        try:
            from server import PromptServer
        except ImportError:  # not inside a ComfyUI server
            return
        server = PromptServer.instance
        if server is not None:
            server.send_sync("iteris.progress", {"node": self.node_id, "prompt_id": self.prompt_id, "concepts": self.concepts,
                                                 "estimate": self.estimate.total_seconds(), **data}, server.client_id)
