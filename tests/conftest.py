"""Shared fixtures: the tiny FLUX (2 double + 2 single blocks, real head layout), the tiny pipeline
(small CLIP, T5 and 16-channel VAE of the real structure, tokenizers built in code) and their engines.

Inductor compiles take seconds per segment on a 2-core CPU, so engines are built once per session.
Profiles use odd token counts: 144x112 -> 9x7 = 63 image tokens, 13 text tokens.
"""

import os

import pytest
import torch

TINY_PROFILES = ((144, 112), (128, 96))
TINY_TEXT = 13


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_tests.sh runs these on the lab GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_fp32():
    """The tiny model in fp32 on CPU (seed 0): the diffusers module the engines are built from."""
    from fluxc.frontend.models import load_model

    return load_model("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)


@pytest.fixture(scope="session")
def tiny_engine_path(tmp_path_factory):
    """A tiny fp32 CPU transformer-only engine with two resolution profiles sharing one weight file."""
    from fluxc.build import BuildOptions, build

    path = str(tmp_path_factory.mktemp("engines") / "tiny-fp32.fluxe")
    build(BuildOptions(model="tiny", output=path, target="cpu", precision="fp32", resolutions=TINY_PROFILES,
                       text_tokens=TINY_TEXT, transformer_only=True))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, tiny_fp32):
    """The tiny pipeline saved as a diffusers FLUX folder: the source of the pipeline engine, and what
    the reference FluxPipeline.from_pretrained loads independently of fluxc."""
    from fluxc.frontend.components import load_components, save_pipeline_folder

    path = str(tmp_path_factory.mktemp("pipelines") / "tiny-flux")
    comps = load_components("tiny", "flux1", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    save_pipeline_folder(path, tiny_fp32.module, comps)
    return path


def build_tiny_pipeline(folder: str, path: str, precision: str = "fp32", **options) -> str:
    """A whole-pipeline CPU engine of a tiny diffusers folder, by default at 144x112 with TINY_TEXT text tokens
    (BuildOptions `options` over those); its path."""
    from fluxc.build import BuildOptions, build

    build(BuildOptions(model=folder, output=path, target="cpu", precision=precision,
                       **({"resolutions": TINY_PROFILES[:1], "text_tokens": TINY_TEXT} | options)))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_engine_path(tmp_path_factory, tiny_pipeline_dir):
    """A whole-pipeline fp32 CPU engine (tokenizers, CLIP, T5, transformer, VAE) at 144x112."""
    return build_tiny_pipeline(tiny_pipeline_dir, str(tmp_path_factory.mktemp("engines") / "tiny-pipeline-fp32.fluxe"))


@pytest.fixture(scope="session")
def tiny_pipeline_engine(tiny_pipeline_engine_path):
    from fluxc.runtime import Engine

    return Engine.load(tiny_pipeline_engine_path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_path):
    from fluxc.runtime import Engine

    return Engine.load(tiny_engine_path)


def random_embeddings(batch=1, text=TINY_TEXT, seed=7, dim=64, pooled=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, text, dim, generator=g, dtype=dtype),
            torch.randn(batch, pooled, generator=g, dtype=dtype))


def denoised_sqnr(engine_path: str, reference_path: str, steps: int = 8, seed: int = 5) -> float:
    """SQNR of one tiny transformer-only engine's latents after `steps` denoising steps against another
    engine's, from the same prompt embeddings and noise."""
    from fluxc.numerics import sqnr_db
    from fluxc.runtime import Engine

    pe, pooled = random_embeddings(dtype=torch.bfloat16)
    got, want = (Engine.load(p).denoise(pe, pooled, height=144, width=112, steps=steps, seed=seed)
                 for p in (engine_path, reference_path))
    return sqnr_db(got, want)


@pytest.fixture
def engine_copy(tiny_engine_path, tmp_path):
    """A writable copy of the tiny engine, for tests that damage it."""
    import shutil

    dst = os.path.join(tmp_path, "copy.fluxe")
    shutil.copytree(tiny_engine_path, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_pipeline_b4_path(tmp_path_factory, tiny_pipeline_dir):
    """The whole-pipeline engine of tiny_pipeline_engine_path with a static batch of 4 (the server tests' engine)."""
    return build_tiny_pipeline(tiny_pipeline_dir, str(tmp_path_factory.mktemp("engines") / "tiny-b4.fluxe"), batch=4)


BATCH_PROMPTS = ["a red cube", "a blue sphere on green grass", "a cat", "the moon over the sea", "a small boat"]
BATCH_SEEDS = [3, 14, 15, 92, 65]


def assert_batches_match(batched, single, rtol: float, steps: int = 3) -> None:
    """A batched engine's images for 1, batch - 1 and batch + 1 prompts (fewer than its batch, and a padded second
    chunk), one seed per prompt, each within rtol of the image the batch-1 engine makes for that prompt and seed."""
    from fluxc.numerics import assert_close_report

    batch = batched.profile_for().batch
    alone = [single.generate(p, seed=s, steps=steps, output_type="pt")
             for p, s in zip(BATCH_PROMPTS[:batch + 1], BATCH_SEEDS)]
    for count in sorted({1, batch - 1, batch + 1}):
        got = batched.generate(BATCH_PROMPTS[:count], seed=BATCH_SEEDS[:count], steps=steps, output_type="pt")
        assert got.shape[0] == count
        for i in range(count):
            assert_close_report(got[i:i + 1], alone[i], rtol=rtol,
                                name=f"batch-{batch} engine, {count} prompts, image {i}")


@pytest.fixture
def hopper_driver():
    """Triton's active driver answering sm_90 for its target: how Triton's compiler (and torch's analysis of which
    arguments a kernel stores to, which compiles the kernel to TTIR) runs without a GPU, as the sm_90a compile
    tests do. Put back afterwards."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    drivers = triton.runtime.driver
    before = drivers._active  # reset_active() would create the default driver, which fails without a GPU
    drivers.set_active(Hopper())
    yield
    drivers._active = before


def segment_nodes(op, outputs: int, *specs) -> list:
    """The call_function nodes AOTAutograd (what Inductor compiles a segment from) makes of one call of `op` on
    fake CUDA tensors (with hopper_driver). specs: (shape, dtype) for a tensor, a list of those, or a plain value.
    outputs: how many outputs the op returns as a tuple (0: one tensor)."""
    import operator

    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs, graph, tensors = [], torch.fx.Graph(), []

    def place(spec):
        if isinstance(spec, list):
            return [place(s) for s in spec]
        if isinstance(spec, tuple):
            tensors.append(spec)
            return graph.placeholder(f"x{len(tensors)}")
        return spec

    call = graph.call_function(op, tuple(place(s) for s in specs))
    graph.output(tuple(graph.call_function(operator.getitem, (call, i)) for i in range(outputs)) if outputs
                 else (call,))
    with FakeTensorMode():
        args = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in tensors]
    with torch.no_grad():
        aot_module_simplified(torch.fx.GraphModule(torch.nn.Module(), graph), args,
                              fw_compiler=lambda g, _: graphs.append(g) or g)
    return [n for n in graphs[0].graph.nodes if n.op == "call_function"]


def kernels_writing(nodes: list) -> list[list[str]]:
    """For segment_nodes: the Triton kernels' written arguments (torch's analysis of the kernel; it clones what
    they name), one list per kernel, after checking that no opaque fluxc op is left."""
    assert not [n for n in nodes if "fluxc" in str(n.target)], nodes
    return [n.kwargs["tensors_to_clone"] for n in nodes
            if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
