"""Give FP8 GEMMs their epilogues: the gated residual of the output projections and the MLP's GELU + quantization
run inside the GEMM (fluxc.fp8_linear_gate_residual, fluxc.fp8_linear_gelu_fp8: runtime/ops/fp8_gemm.py); and,
with "plain", the GEMMs left without one run on the same Triton kernel (fluxc.fp8_linear) instead of cuBLAS.

Pattern, gated residual (a double block's attention and MLP output projections, image and text; a single block's
output projection, which fuse_epilogues split into its attention and MLP halves):
    %y = aten._scaled_mm(%a, aten.t(%w), %sa, aten.t(%sw), %bias, None, bf16)                        [M, N]
         (a single block: aten.add.Tensor of two such GEMMs)
    %out = aten.add.Tensor(%residual, aten.mul.Tensor(aten.unsqueeze(%gate, 1), aten.view(%y, [B, S, N])))
         (FLUX.2: a [B, 1, N] gate, squeezed for the kernel; aten._unsafe_view as well as aten.view)
Rewrite:
    %out = fluxc.fp8_linear_gate_residual(%a, %sa, %w, %sw, %bias, %gate, %residual)
           (two GEMMs: the first's output is the second's residual; with "joined", where one of them has the
           bias, one op whose K loop runs the other first: fp8_linear_gate_residual(<the one with the bias>,
           %gate, %residual, <the other's a, sa, w, sw>))
Pattern, GELU (the MLP up-projections), once every GEMM that reads the quantized GELU output was rewritten above:
    %q, %s = fluxc.gelu_fp8(aten._scaled_mm(%xq, aten.t(%w), %sx, aten.t(%sw), %bias, None, bf16))
Rewrite:
    %q, %s = fluxc.fp8_linear_gelu_fp8(%xq, %sx, %w, %sw, %bias)      %s: [M, N / 128], one scale per 1x128 block
    (the reading GEMMs take %q, %s directly: the views between them only flattened [B, S] and back)
The GELU output is written once, in e4m3, where today it is written in bf16, read back, quantized and written
again; the projections' bf16 output goes straight into the residual stream.
Pattern, plain (after the others): any other such _scaled_mm -> fluxc.fp8_linear(%a, %sa, %w, %sw, %bias),
    where the Triton kernel is the faster on the GPU building the engine (fluxc.tactics measures both at the shape;
    a CPU build rewrites them all, and the op leaves fewer than CUBLAS_BELOW rows to cuBLAS in any case); the
    manifest's pass_reports keep the timings, {"plain_ms": {"MxNxK": {"triton": ms, "cublas": ms}}}
The recipe's fp8_epilogues names which: "gate_residual", "joined" and "gelu" (which need "gate_residual"), "plain".
Pre:  quantize_fp8 ran, with bf16 GEMM outputs, and scales the kernel reads: [M, 1] per token, or one [1, 1] scale
that quantize_fp8 expanded to rows for _scaled_mm (FP8 attention's output, on v's scale: the op takes the [1, 1]
scale, not a copy of it per row); compiler/validate.py keeps calibrated builds' static scales out.
Post: counts["gate_residual"] == 4 per double block and 1 per single block, counts["gelu"] == 2 per double
block and 1 per single block with "gelu", else 0, counts["plain"] the GEMMs left (tiny, pinned by
tests/test_fp8.py); FLUX.2 (SwiGLU MLP, no GELU): 4 and 1 gated
residuals, no GELU (tiny-flux2, tests/test_flux2.py).
Numerics: the GEMMs are the same FP8 GEMMs (joined: the two halves summed in fp32 and rounded once, within
REWRITE_TOLERANCE[bf16] of the chain, tests/test_fp8.py); what changes is the GELU output's scaling, 1x128 blocks
instead of one scale per token (finer: each block's amax is at most its row's), and the gated residual rounded once
in fp32 instead of twice in bf16. Contract: each linear at or above numerics.FP8_LINEAR_SQNR_DB against float64, and a
segment at or above numerics.FP8_SEGMENT_SQNR_DB against its bf16 graph, as quantize_fp8's.
"""

import operator

import torch

from fluxc import tactics
from fluxc.passes.base import NoMatch, PassContext, PassResult, aten, call, is_aten, rewrite_all
from fluxc.runtime.ops.fp8_gemm import BLOCK, on_cublas

GATE_RESIDUAL, GELU_FP8 = torch.ops.fluxc.fp8_linear_gate_residual.default, torch.ops.fluxc.fp8_linear_gelu_fp8.default
LINEAR = torch.ops.fluxc.fp8_linear.default


def _operands(mm: torch.fx.Node, depth: int, one_user: bool = True) -> tuple:
    """(a, a_scale, w, w_scale, bias) of a _scaled_mm with per-token or block activation scales (and one user, for
    an epilogue to take the output's place)."""
    if not is_aten(mm, aten._scaled_mm.default) or (one_user and len(mm.users) != 1):
        raise NoMatch(mm, "not an FP8 GEMM (_scaled_mm) with one user", depth)
    a, wt, sa, swt, bias, *rest = (*mm.args, *[None] * (7 - len(mm.args)))
    if not (is_aten(wt, aten.t.default) and is_aten(swt, aten.t.default)) or rest[0] is not None:
        raise NoMatch(mm, "the GEMM's weight or scale is not a transposed weight input", depth)
    if mm.meta["val"].dtype != torch.bfloat16:
        raise NoMatch(mm, f"the GEMM writes {mm.meta['val'].dtype}: the kernel rounds its output to bf16", depth)
    (m, k), scale = a.meta["val"].shape, sa.meta["val"].shape
    if k % BLOCK or tuple(scale) not in ((m, 1), (m, k // BLOCK)):
        raise NoMatch(mm, f"activation scales {tuple(scale)} are not per token (static or per-tensor scales), or K "
                          f"{k} is not a multiple of {BLOCK}", depth)
    return a, _one_scale(sa), wt.args[0], swt.args[0], bias


def _one_scale(sa: torch.fx.Node) -> torch.fx.Node:
    """A per-tensor scale s [1, 1] that quantize_fp8 copied into rows for _scaled_mm (clone(expand(s, [M, 1])): the
    FP8 attention output's) as s itself, which the kernel reads once (a copy kernel per GEMM less); other scales as
    they are."""
    if is_aten(sa, aten.clone.default) and is_aten(sa.args[0], aten.expand.default):
        s = sa.args[0].args[0]
        if tuple(s.meta["val"].shape) == (1, 1):
            return s
    return sa


def _gated(out: torch.fx.Node):
    """(residual, gate, whether the gate is [B, 1, N], the GEMMs' operands) of residual + gate * view(y), else
    NoMatch. FLUX.1 gates are unsqueeze(gate [B, N], 1); FLUX.2's are [B, 1, N] slices of the modulation."""
    mul = next((x for x in out.args if is_aten(x, aten.mul.Tensor) and len(x.users) == 1), None)
    if mul is None:
        raise NoMatch(out, "not residual + (gate * y)", 0)
    residual = out.args[1] if out.args[0] is mul else out.args[0]
    view = next((x for x in mul.args if is_aten(x, aten.view.default, aten._unsafe_view.default)
                 and len(x.users) == 1 and x.args[0].meta["val"].dim() == 2), None)  # [M, N] -> [B, S, N]
    if len(mul.args) != 2 or view is None:
        raise NoMatch(mul, "the product is not gate * view(y)", 1)
    gate = mul.args[0] if mul.args[1] is view else mul.args[1]
    if not (isinstance(gate, torch.fx.Node) and isinstance(residual, torch.fx.Node)):
        raise NoMatch(mul, "the gate or the residual is a constant", 1)
    unsqueezed = is_aten(gate, aten.unsqueeze.default) and gate.args[1] == 1
    gate, y = (gate.args[0] if unsqueezed else gate), view.args[0]
    shape = tuple(gate.meta["val"].shape)
    b, _, n = out.meta["val"].shape
    if shape != ((b, n) if unsqueezed else (b, 1, n)) or residual.meta["val"].shape != out.meta["val"].shape:
        raise NoMatch(mul, f"the gate {shape} is not [B, N] unsqueezed or [B, 1, N], or the residual not [B, S, N]", 2)
    halves = y.args if is_aten(y, aten.add.Tensor) and len(y.users) == 1 else (y,)
    return residual, gate, not unsqueezed, [_operands(mm, 3) for mm in halves]


def fuse_gate_residual(gm: torch.fx.GraphModule, out: torch.fx.Node, joined: bool) -> None:
    residual, gate, squeeze, gemms = _gated(out)
    with gm.graph.inserting_before(out):
        if squeeze:  # [B, 1, N] -> [B, N]: the kernel reads a gate row per batch element
            gate = call(gm.graph, aten.squeeze.dim, gate, 1)
        if joined and len(gemms) == 2 and None in (gemms[0][4], gemms[1][4]):  # one bias between them
            lead, main = sorted(gemms, key=lambda operands: operands[4] is not None)  # the bias in the main's epilogue
            residual = call(gm.graph, GATE_RESIDUAL, *main, gate, residual, *lead[:4])
        else:
            for operands in gemms:
                residual = call(gm.graph, GATE_RESIDUAL, *operands, gate, residual)
    out.replace_all_uses_with(residual)


def _through_views(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The non-view nodes that read `node` through chains of aten.view."""
    out = []
    for user in node.users:
        out += _through_views(user) if is_aten(user, aten.view.default) else [user]
    return out


def fuse_gelu(gm: torch.fx.GraphModule, gelu: torch.fx.Node) -> None:
    operands = _operands(gelu.args[0], 0)
    outputs = {u.args[1]: u for u in gelu.users if u.target is operator.getitem}
    readers = {r for out in outputs.values() for r in _through_views(out)}
    if len(outputs) != 2 or not readers or any(r.target is not GATE_RESIDUAL for r in readers):
        raise NoMatch(gelu, "the quantized GELU output is read by other than fused gated-residual GEMMs", 1)
    n = outputs[0].meta["val"].shape[-1]
    if n % BLOCK:
        raise NoMatch(gelu, f"N {n} is not a multiple of {BLOCK}", 2)
    for reader in readers:  # the views between are a flatten and its inverse: the reader's a, sa shapes are theirs
        a, sa = reader.args[:2]
        if a.meta["val"].shape != outputs[0].meta["val"].shape or sa.meta["val"].shape != outputs[1].meta["val"].shape:
            raise NoMatch(reader, "the views between the GELU and its GEMM change its shape", 3)
    with gm.graph.inserting_before(gelu):
        fused = call(gm.graph, GELU_FP8, *operands)
        q, s = (call(gm.graph, operator.getitem, fused, i) for i in (0, 1))
    for reader in readers:
        reader.args = (q, s, *reader.args[2:])


def fuse_plain(gm: torch.fx.GraphModule, mm: torch.fx.Node, measured: dict) -> None:
    """measured: {"MxNxK": fluxc.tactics' timings} of the shapes measured, for the manifest."""
    operands = _operands(mm, 0, one_user=False)
    a, a_scale, w, _, bias = (x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in operands)
    if a.is_cuda and not on_cublas(a, a_scale):
        (m, k), n = a.shape, w.shape[0]
        ms = measured[f"{m}x{n}x{k}"] = tactics.fp8_linear_ms(m, n, k, bias is not None, a.device)
        if ms["cublas"] <= ms["triton"]:
            raise NoMatch(mm, f"cuBLAS measured faster on this GPU at {m}x{n}x{k}: {ms['cublas']:.3f} ms against the "
                              f"Triton kernel's {ms['triton']:.3f}", 1)
    with gm.graph.inserting_before(mm):
        mm.replace_all_uses_with(call(gm.graph, LINEAR, *operands))


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """The epilogues ctx.recipe.fp8_epilogues names ("gate_residual", then "gelu", which needs the first; then
    "plain")."""
    epilogues = ctx.recipe.fp8_epilogues
    adds = ([n for n in gm.graph.nodes if is_aten(n, aten.add.Tensor) and n.meta["val"].dim() == 3]
            if "gate_residual" in epilogues else [])
    gated, rejected = rewrite_all(adds, lambda n: fuse_gate_residual(gm, n, "joined" in epilogues))
    gm.graph.eliminate_dead_code()  # the replaced GEMMs, so that each GELU's readers are the fused ops
    gelus = [n for n in gm.graph.nodes if n.target is torch.ops.fluxc.gelu_fp8.default]
    fused, more = rewrite_all(gelus if "gelu" in epilogues else [], lambda n: fuse_gelu(gm, n))
    gm.graph.eliminate_dead_code()
    counts, rejected = {"gate_residual": gated, "gelu": fused}, rejected + more
    if "plain" in epilogues:
        gemms = [n for n in gm.graph.nodes if is_aten(n, aten._scaled_mm.default)]
        measured = {}
        counts["plain"], more = rewrite_all(gemms, lambda n: fuse_plain(gm, n, measured))
        rejected += more
        gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, counts, rejected, report={"plain_ms": measured} if "plain" in epilogues else None)
