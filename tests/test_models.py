"""Model sources: seeded random architectures, diffusers folders, BFL single-file checkpoints."""

import os

import torch
from safetensors.torch import save_file

from fluxc.frontend.models import load_model

CPU = torch.device("cpu")


def test_random_weights_are_deterministic_per_seed():
    a = load_model("tiny", dtype=torch.float32, device=CPU, seed=3).module.state_dict()
    b = load_model("tiny", dtype=torch.float32, device=CPU, seed=3).module.state_dict()
    c = load_model("tiny", dtype=torch.float32, device=CPU, seed=4).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embedder.weight"], c["x_embedder.weight"])
    w = a["transformer_blocks.0.ff.net.2.weight"]  # N(0, 1/fan_in): keeps 57 random blocks stable
    assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.05


def test_named_architectures_have_the_real_shapes():
    from fluxc.frontend.models import ARCHITECTURES, FLUX1_DEFAULTS

    family, cfg, text = ARCHITECTURES["flux1-dev"]
    assert (family, cfg["num_layers"], cfg["num_single_layers"], text) == ("flux1", 19, 38, 512)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072 and cfg["guidance_embeds"]
    assert not ARCHITECTURES["flux1-schnell"][1]["guidance_embeds"]
    with torch.device("meta"):
        flux2 = load_model("tiny-flux2", dtype=torch.float32, device=CPU)
    assert flux2.family == "flux2" and type(flux2.module).__name__ == "Flux2Transformer2DModel"
    assert FLUX1_DEFAULTS["axes_dims_rope"] == (16, 56, 56)


def test_diffusers_folder_roundtrip(tmp_path, tiny_fp32):
    tiny_fp32.module.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    loaded = load_model(str(tmp_path / "pipe"), dtype=torch.float32, device=CPU)
    ref = tiny_fp32.module.state_dict()
    got = loaded.module.state_dict()
    assert loaded.family == "flux1" and loaded.source["kind"] == "diffusers"
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _to_bfl(sd: dict, n_double: int, n_single: int) -> dict:
    """diffusers -> Black Forest Labs key names, written from the FLUX reference layout."""
    bfl = {}

    def lin(dst, src):
        bfl[f"{dst}.weight"], bfl[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def cat(dst, srcs):
        for p in ("weight", "bias"):
            bfl[f"{dst}.{p}"] = torch.cat([sd[f"{s}.{p}"] for s in srcs])

    lin("img_in", "x_embedder"), lin("txt_in", "context_embedder")
    for bfl_name, d_name in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                             ("guidance_in", "guidance_embedder")):
        lin(f"{bfl_name}.in_layer", f"time_text_embed.{d_name}.linear_1")
        lin(f"{bfl_name}.out_layer", f"time_text_embed.{d_name}.linear_2")
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear"), lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        cat(f"{b}.img_attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"])
        cat(f"{b}.txt_attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        lin(f"{b}.img_attn.proj", f"{d}.attn.to_out.0"), lin(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        lin(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj"), lin(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj"), lin(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            bfl[f"{b}.{stream}_attn.norm.query_norm.scale"] = sd[f"{d}.attn.{q}.weight"]
            bfl[f"{b}.{stream}_attn.norm.key_norm.scale"] = sd[f"{d}.attn.{k}.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        lin(f"{b}.linear2", f"{d}.proj_out"), lin(f"{b}.modulation.lin", f"{d}.norm.linear")
        bfl[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        bfl[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    lin("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' is (scale, shift)
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        bfl[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}


def test_bfl_single_file_checkpoint_with_real_shapes(tmp_path):
    """Real FLUX.1-dev key names and tensor shapes (inner dim 3072), one block of each kind."""
    from diffusers import FluxTransformer2DModel

    from fluxc.frontend.models import FLUX1_DEFAULTS, init_random_

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**dict(FLUX1_DEFAULTS, num_layers=1, num_single_layers=1))
    ref = ref.to_empty(device=CPU).to(torch.bfloat16)
    init_random_(ref, seed=1)
    sd = ref.state_dict()
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file(_to_bfl(sd, 1, 1), path)
    del ref
    loaded = load_model(path, dtype=torch.bfloat16, device=CPU)
    assert loaded.source["kind"] == "bfl-single-file"
    cfg = loaded.config
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"]) == (1, 1, True)
    assert (cfg["joint_attention_dim"], cfg["pooled_projection_dim"], cfg["in_channels"]) == (4096, 768, 64)
    got = loaded.module.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def _to_bfl_flux2(sd: dict, n_double: int, n_single: int) -> dict:
    """diffusers -> Black Forest Labs FLUX.2 key names, written from the FLUX.2 reference layout (no biases)."""
    bfl = {"img_in.weight": sd["x_embedder.weight"], "txt_in.weight": sd["context_embedder.weight"],
           "final_layer.linear.weight": sd["proj_out.weight"]}
    for bfl_name, d_name in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        bfl[f"{bfl_name}.in_layer.weight"] = sd[f"time_guidance_embed.{d_name}.linear_1.weight"]
        bfl[f"{bfl_name}.out_layer.weight"] = sd[f"time_guidance_embed.{d_name}.linear_2.weight"]
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        bfl[f"{name}.lin.weight"] = sd[f"{name}.linear.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2)  # BFL's final modulation is (shift, scale)
    bfl["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        bfl[f"{b}.img_attn.qkv.weight"] = torch.cat([sd[f"{d}.attn.to_{x}.weight"] for x in "qkv"])
        bfl[f"{b}.txt_attn.qkv.weight"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.weight"] for x in "qkv"])
        for bfl_name, d_name in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                 ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
                                 ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out")):
            bfl[f"{b}.{bfl_name}.weight"] = sd[f"{d}.{d_name}.weight"]
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            bfl[f"{b}.{stream}_attn.norm.query_norm.scale"] = sd[f"{d}.attn.{q}.weight"]
            bfl[f"{b}.{stream}_attn.norm.key_norm.scale"] = sd[f"{d}.attn.{k}.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        bfl[f"{b}.linear1.weight"] = sd[f"{d}.attn.to_qkv_mlp_proj.weight"]
        bfl[f"{b}.linear2.weight"] = sd[f"{d}.attn.to_out.weight"]
        bfl[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        bfl[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}


def test_bfl_flux2_single_file_checkpoint(tmp_path):
    """A FLUX.2 checkpoint in Black Forest Labs' key names (tiny-flux2's shapes, 2 + 2 blocks): recognised as
    FLUX.2, its config read off the shapes (heads, MLP ratio, guidance), every tensor where diffusers has it."""
    ref = load_model("tiny-flux2", dtype=torch.float32, device=CPU, seed=2)
    sd = ref.module.state_dict()
    path = str(tmp_path / "flux2.safetensors")
    save_file(_to_bfl_flux2(sd, 2, 2), path)
    loaded = load_model(path, dtype=torch.float32, device=CPU)
    assert loaded.family == "flux2" and loaded.source["kind"] == "bfl-single-file"
    for key in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                "mlp_ratio", "in_channels", "guidance_embeds", "timestep_guidance_channels"):
        assert loaded.config[key] == ref.config[key], key
    got = loaded.module.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_in_code_tokenizers_are_the_same_in_every_process():
    """Engines and reference pipelines built in different processes must tokenize alike (the
    `tokenizers` BPE trainer breaks ties differently per process; fluxc learns its merges itself)."""
    import subprocess
    import sys

    from fluxc.frontend.components import clip_tokenizer, t5_tokenizer

    code = "from fluxc.frontend.components import clip_tokenizer as c, t5_tokenizer as t; print(c().tokenizer.to_str()); print(t().tokenizer.to_str())"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)]
    here = clip_tokenizer().tokenizer.to_str() + "\n" + t5_tokenizer().tokenizer.to_str() + "\n"
    assert outs[0] == outs[1] == here
