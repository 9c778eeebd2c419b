"""Build options and their validation: target x precision x recipe x shapes x output, in one place, before any
work starts (STYLE rule 9: never a silent downgrade)."""

import dataclasses
import importlib.util

import torch

from fluxc.frontend.models import check_source, weight_bytes
from fluxc.passes.pipeline import Pass, resolve
from fluxc.recipes import DEFAULT_FOR_PRECISION, RECIPES, Precision, Recipe, recipe_from_dict
from fluxc.runtime.core import targets
from fluxc.runtime.core.bundle import check_writable
from fluxc.runtime.core.schema import ALONE, ENCODER_PLACEMENTS, TASKS
from fluxc.runtime.core.errors import FluxcError
from fluxc.runtime.core.profile import Profile
from fluxc.runtime.ops.kernels import FP8_ATTENTION_KERNELS

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str
    output: str
    target: str = "auto"
    precision: str | None = None  # None: the recipe's, or bf16 without a recipe
    recipe: str | None = None
    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)
    text_tokens: int | None = None  # default: the model family's (512 for FLUX.1-dev)
    batch: int = 1
    seed: int = 0
    backend: str = "inductor"
    dump_ir: str | None = None
    transformer_only: bool = False
    encoders: str | None = None  # gpu | offload | cpu; default: gpu on a GPU target, cpu on the CPU target
    recipe_overrides: tuple[tuple[str, object], ...] = ()  # (field, value) over the named recipe (benchmarks)
    calibrate: int = 0  # fp8/nvfp4: static activation scales from this many calibration samples (compiler/calibrate.py)
    stage: str = "engine"  # "plan": stop before the target-specific lowering and write a portable plan
    from_plan: str | None = None  # finish this plan (compiler/plan.py) into an engine for the target
    cache: dict | None = None  # CacheConfig fields over the recipe's default step-skipping policy (--cache ...)
    world_size: int = 1  # ranks one image's tokens are split over (context parallelism, runtime/parallel.py)
    sign_key: str | None = None  # Ed25519 private key (PEM) to sign the engine with (runtime/core/signing.py)
    tasks: tuple[str, ...] = ("t2i",)  # what the engine does: t2i (+ img2img, inpaint), or fill, kontext, references
    references: int = 1  # with --tasks references (FLUX.2): reference images per edit


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated options: everything a build needs, decided before any work starts."""

    recipe: Recipe
    target: str
    device: torch.device
    dtype: torch.dtype
    encoders: str | None  # where the text encoders live; None for a transformer-only engine
    pipeline: tuple[Pass, ...]  # the passes for this recipe and target, resolved once

    @property
    def encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.encoders == "cpu" else self.device


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise FluxcError(f"Resolution '{text}' is not HEIGHTxWIDTH.", "Write it like 1024x1024.") from None
    return h, w


def validate(opts: BuildOptions) -> Settings:
    """Check target x precision x recipe x shapes in one place, before loading anything."""
    if opts.stage not in ("engine", "plan"):
        raise FluxcError(f"Unknown stage '{opts.stage}'.", "Use --stage engine (the default) or --stage plan.")
    recipe = choose_recipe(opts)
    if opts.target != "auto":
        targets.sm(opts.target)  # a FluxcError for a name that is no target
    here = targets.local_target()
    target = here if opts.target == "auto" else opts.target
    _check_target(recipe, target)
    _check_backend(opts.backend, recipe, bool(opts.calibrate), target)
    if opts.calibrate and recipe.precision not in (Precision.FP8, Precision.NVFP4):
        raise FluxcError(f"--calibrate sets static FP8 or NVFP4 activation scales; this build is "
                         f"{recipe.precision.value}.", "Add --precision fp8 or nvfp4, or drop --calibrate.")
    if opts.calibrate < 0:
        raise FluxcError(f"--calibrate {opts.calibrate}: the number of calibration samples cannot be negative.",
                         "Use --calibrate N with N >= 1 (or leave it out for per-token scales at run time).")
    if target != here and opts.stage != "plan":
        raise FluxcError(
            f"Cannot compile for {target} on this machine ({here}): engines are compiled on the GPU they run on.",
            f"Build on a {target} machine or use --target {here} (or auto); or write a portable plan here with "
            f"--stage plan and finish it on the {target} machine with fluxc build --from PLAN.")
    for h, w in opts.resolutions:
        if h <= 0 or w <= 0 or h % 16 or w % 16:
            raise FluxcError(f"Resolution {h}x{w} is not a positive multiple of 16 in both sides.",
                             f"Use e.g. {max(16, h // 16 * 16)}x{max(16, w // 16 * 16)}: FLUX packs 2x2 latents of 8x8 pixels.")
    if opts.batch < 1:
        raise FluxcError(f"Batch size {opts.batch} is less than 1.", "Use --batch 1 or more.")
    source_kind = check_source(opts.model)
    _check_world_size(opts, recipe)
    encoders = None if opts.transformer_only else _encoder_placement(opts, target, source_kind)
    _check_tasks(opts)
    check_writable(opts.output)
    # traced (and, for an engine, compiled) here: a plan for another target is traced on this machine
    device, dtype = targets.target_device(here), TORCH_DTYPES[recipe.precision.activation_dtype]
    _check_memory(opts.model, dtype, device)
    return Settings(recipe, target, device, dtype, encoders, tuple(resolve(recipe, target)))


def validate_finish(opts: BuildOptions, header: dict) -> Settings:
    """Check that the plan verify_plan read can be finished into an engine for opts.target on this machine."""
    if opts.stage != "engine":
        raise FluxcError("--from finishes a plan into an engine; --stage plan does not apply to it.", "Drop --stage.")
    recipe = recipe_from_dict(header["recipe"])
    here = targets.local_target()
    target = here if opts.target == "auto" else opts.target
    if target != here:
        raise FluxcError(f"Cannot finish a plan for {target} on this machine ({here}): engines are compiled on the "
                         "GPU they run on.", f"Run fluxc build --from on a {target} machine, or use --target {here}.")
    _check_target(recipe, target)
    _check_backend(opts.backend, recipe, header["calibration"] is not None, target)
    device = targets.target_device(target)
    traced = "cuda" if any(s["device"] == "cuda" for s in header["segments"]) else "cpu"
    if traced != device.type:
        raise FluxcError(f"Plan '{opts.from_plan}' was traced on a {traced} machine; it finishes into engines for "
                         f"{traced} targets only, and {target} is not one.",
                         "Write the plan on a machine of the target's kind (a GPU for a GPU target).")
    check_writable(opts.output)
    encoders = header["components"] and header["components"]["encoders"]
    return Settings(recipe, target, device, TORCH_DTYPES[recipe.precision.activation_dtype], encoders,
                    tuple(resolve(recipe, target)))


def choose_recipe(opts: BuildOptions) -> Recipe:
    """The named recipe (which implies its precision), else the precision's default recipe, with overrides."""
    precision = None
    if opts.precision is not None:
        try:
            precision = Precision(opts.precision)
        except ValueError:
            raise FluxcError(f"Unknown precision '{opts.precision}'.",
                             "Use one of: " + ", ".join(p.value for p in Precision) + ".") from None
    name = opts.recipe or DEFAULT_FOR_PRECISION[precision or Precision.BF16]
    if name not in RECIPES:
        raise FluxcError(f"Unknown recipe '{name}'.", "Use one of: " + ", ".join(RECIPES) + ".")
    recipe = RECIPES[name]()
    if precision is not None and recipe.precision is not precision:
        raise FluxcError(f"Recipe '{name}' is {recipe.precision.value}, but --precision {precision.value} was given.",
                         f"Drop --precision (the recipe implies {recipe.precision.value}), or pick a "
                         f"{precision.value} recipe.")
    if opts.recipe_overrides:
        unknown = set(dict(opts.recipe_overrides)) - {f.name for f in dataclasses.fields(Recipe)}
        if unknown:
            raise FluxcError(f"Unknown recipe fields {sorted(unknown)}.", "See fluxc.recipes.Recipe for the fields.")
        recipe = dataclasses.replace(recipe, **dict(opts.recipe_overrides))
    if opts.cache:
        recipe = dataclasses.replace(recipe, cache=recipe.cache.with_overrides(**opts.cache))
    return recipe


def _check_target(recipe: Recipe, target: str) -> None:
    """The precision and the recipe's kernels against the target's SM (the CPU target emulates everything)."""
    if recipe.fp8_attention_kernel not in ("auto", *FP8_ATTENTION_KERNELS):
        raise FluxcError(f"Recipe '{recipe.name}': fp8_attention_kernel '{recipe.fp8_attention_kernel}' is not one of "
                         f"auto, {', '.join(FP8_ATTENTION_KERNELS)}.", "Use 'cudnn' (cuDNN's FP8 SDPA, the default), "
                         "'flash3' (FlashAttention-3, sm_90 only) or 'auto' (the faster, measured at build time).")
    if targets.sm(target) is None:
        return
    fp8 = f"sm_{targets.FIRST_SM['fp8']}"
    if recipe.precision is Precision.FP8 and not targets.has(target, "fp8"):
        raise FluxcError(f"--precision fp8 needs FP8 tensor cores ({fp8} or newer); {target} has none.",
                         f"Build --precision bf16 for this GPU, or target an {fp8}+ GPU (L40S, H100, H200, B200).")
    if recipe.precision is Precision.NVFP4 and not targets.has(target, "fp8"):
        raise FluxcError(f"--precision nvfp4 runs natively on sm_{targets.FIRST_SM['nvfp4']} and newer, and its "
                         f"emulation needs FP8 conversions ({fp8} or newer); {target} has neither.",
                         f"Build --precision bf16 for this GPU, or target an {fp8}+ GPU.")
    if recipe.fp8_attention and recipe.fp8_attention_kernel == "flash3" and targets.sm(target) != 90:
        raise FluxcError(f"Recipe '{recipe.name}' runs attention through FlashAttention-3's FP8 forward, whose kernels "
                         f"are Hopper's (sm_90); {target} is not.", "Use fp8_attention_kernel 'cudnn' there.")
    if recipe.fp8_attention and not targets.has(target, "cudnn_attention"):
        raise FluxcError(f"Recipe '{recipe.name}' runs attention through cuDNN's FP8 SDPA, which needs "
                         f"sm_{targets.FIRST_SM['cudnn_attention']} or newer; {target} is older.",
                         "Use --recipe sm90_fp8 (FP8 GEMMs, bf16 attention) there.")


def _check_backend(backend: str, recipe: Recipe, calibrated: bool, target: str) -> None:
    if backend == "tensorrt" and not importlib.util.find_spec("tensorrt"):
        raise FluxcError("--backend tensorrt: TensorRT (`import tensorrt`) is not installed here.",
                         "Build the stage TensorRT takes with --backend onnx: one checked opset-23 ONNX model per "
                         "segment, FP8 and NVFP4 as TensorRT's Q/DQ patterns; build TensorRT plans from it (or "
                         "rerun with --backend tensorrt) where TensorRT is installed.")
    if backend not in ("inductor", "onnx", "tensorrt"):
        raise FluxcError(f"Unknown backend '{backend}'.", "Use --backend inductor, onnx or tensorrt.")
    if backend == "tensorrt" and target == "cpu":
        raise FluxcError("--backend tensorrt builds plans for the NVIDIA GPU it runs on, not --target cpu.",
                         "Build on the GPU with --target auto, or use --backend onnx for CPU engines.")
    if backend != "inductor" and recipe.precision is Precision.NVFP4 and not calibrated:
        raise FluxcError(f"--backend {backend} exports NVFP4 activations through TensorRT's TRT_FP4DynamicQuantize, "
                         "whose global scale is a build-time constant: it needs calibrated activation scales.",
                         "Add --calibrate N (e.g. 4), or build --precision nvfp4 with --backend inductor.")
    if backend != "inductor" and recipe.fp8_attention:
        raise FluxcError(f"--backend {backend} does not export cuDNN's FP8 attention (recipe {recipe.name}).",
                         "Use --recipe sm90_fp8 (bf16 attention) with ONNX.")
    epilogues = set(recipe.fp8_epilogues)
    if not epilogues <= {"gate_residual", "joined", "gelu", "plain"} or (
            epilogues & {"joined", "gelu"} and "gate_residual" not in epilogues):
        raise FluxcError(f"Recipe {recipe.name}'s fp8_epilogues {recipe.fp8_epilogues} are not a choice of "
                         "'gate_residual', 'joined' and 'gelu' (which need 'gate_residual': 'joined' fuses a "
                         "single block's two gated output projections into one, the GELU's down-projection reads "
                         "its 1x128 blocks) and 'plain'.",
                         "Use e.g. ('gate_residual',) or ('gate_residual', 'gelu').")
    if recipe.fp8_epilogues and backend != "inductor":
        raise FluxcError(f"Recipe {recipe.name}'s Triton GEMMs read per-token activation scales; --backend {backend} "
                         "does not export them.", "Use --recipe sm90_fp8 with ONNX.")
    if recipe.fp8_epilogues and calibrated:
        raise FluxcError(f"Recipe {recipe.name}'s Triton GEMMs read per-token activation scales; --calibrate makes "
                         "static per-tensor ones.", "Use --recipe sm90_fp8 with --calibrate, or drop --calibrate.")


def _check_world_size(opts: BuildOptions, recipe: Recipe) -> None:
    if opts.world_size < 1:
        raise FluxcError(f"--world-size {opts.world_size} is less than 1.", "Use 1 (one GPU) or the number of GPUs.")
    if opts.world_size > 1 and recipe.fp8_attention:
        raise FluxcError(f"--world-size {opts.world_size}: context parallelism does not shard cuDNN's FP8 attention "
                         f"(recipe {recipe.name}).", "Use --recipe sm90_fp8 (FP8 GEMMs, bf16 attention).")


def check_shards(model, profiles: list[Profile]) -> None:
    """Every rank must get an equal share of the heads, the text tokens and each profile's image tokens."""
    n = profiles[0].world_size
    heads = model.config["num_attention_heads"]
    for what, count in [("attention heads", heads), ("text tokens", profiles[0].text_tokens)] + [
            (f"image tokens at {p.name}", p.image_tokens) for p in profiles]:
        if count % n:
            raise FluxcError(f"--world-size {n} does not divide the model's {count} {what}: every rank takes an "
                             "equal share.", f"Use a world size that divides {count}"
                             + (" (a resolution whose (H/16) x (W/16) it divides)." if "image" in what else "."))


def _check_memory(model: str, dtype: torch.dtype, device: torch.device) -> None:
    """The transformer's weights must fit in what the build device has free (a lower bound: tracing and the
    transformed weights need more), or the build would die later in the allocator."""
    need = weight_bytes(model, dtype)
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "free on this GPU"
    else:
        free, where = _available_host_memory(), "available in this machine's memory"
    if free is not None and need > free:
        raise FluxcError(f"Model '{model}' needs at least {need / 1e9:.1f} GB for its transformer weights alone "
                         f"({str(dtype).removeprefix('torch.')}); {free / 1e9:.1f} GB are {where}.",
                         "Build on a machine with more memory (a GPU target builds on the GPU), or use a smaller "
                         "model (e.g. --model tiny for a try-out).")


def _available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_tasks(opts: BuildOptions) -> None:
    unknown = [t for t in opts.tasks if t not in TASKS]
    if unknown or ("t2i" not in opts.tasks and not (len(opts.tasks) == 1 and opts.tasks[0] in ALONE)):
        raise FluxcError(f"--tasks {','.join(opts.tasks)}: " + (f"unknown task {unknown[0]!r}" if unknown else
                         "an engine does t2i (and image tasks), or fill, kontext or references alone") + ".",
                         "Use --tasks t2i, t2i with img2img and/or inpaint, fill (FLUX.1 Fill models), kontext "
                         "(FLUX.1 Kontext) or references (FLUX.2).")
    if {"kontext", "references"} & set(opts.tasks) and opts.world_size > 1:
        raise FluxcError(f"--tasks {opts.tasks[0]} with --world-size: context parallelism does not shard the reference "
                         "images' tokens yet.", "Build reference-editing engines with --world-size 1.")
    if set(ALONE) & set(opts.tasks) and opts.calibrate:
        raise FluxcError(f"--calibrate with --tasks {opts.tasks[0]}: calibration runs text-to-image samples, without "
                         "the masked-image channels or reference tokens this engine's transformer takes.",
                         "Build without --calibrate (dynamic activation scales), or calibrate a --tasks t2i engine.")
    if "references" in opts.tasks and not 1 <= opts.references <= 4:
        raise FluxcError(f"--references {opts.references}: an engine takes 1 to 4 reference images.",
                         "Use --references 1 to 4.")
    if len(opts.tasks) > 1 and opts.transformer_only:
        raise FluxcError(f"--tasks {','.join(opts.tasks)} needs the VAE encoder; --transformer-only has no VAE.",
                         "Drop --transformer-only, or build --tasks t2i.")


def _encoder_placement(opts: BuildOptions, target: str, source_kind: str) -> str:
    if source_kind == "single-file":
        raise FluxcError(f"'{opts.model}' holds a transformer only; a whole-pipeline engine also needs the text "
                         "encoders, tokenizers and VAE of a diffusers FLUX folder.",
                         "Pass the diffusers pipeline folder, or build with --transformer-only.")
    placement = opts.encoders or ("cpu" if target == "cpu" else "gpu")
    if placement not in ENCODER_PLACEMENTS:
        raise FluxcError(f"Unknown encoder placement '{placement}'.", "Use one of: " + ", ".join(ENCODER_PLACEMENTS) + ".")
    if target == "cpu" and placement != "cpu":
        raise FluxcError(f"--encoders {placement} needs a GPU target; this build is for the CPU.",
                         "Drop --encoders (the CPU target keeps everything on the CPU).")
    return placement
