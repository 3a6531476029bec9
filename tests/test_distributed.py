"""Beyond one device: sparse fine-tuning with FSDP2/DDP and sharded inference with accelerate.

CPU tests run examples/finetune_fsdp.py on 2 gloo processes and load sparsified models
split by an accelerate ``device_map`` over the CPU and disk offload (the same hooks that
split a model over GPUs). The ``gpu`` tests need 2 GPUs: the same script with NCCL, and a
model split layer-wise over cuda:0 and cuda:1.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modelopt_sparse as mts
from modelopt_sparse.kernels import attention

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "finetune_fsdp.py"
VOCAB, LAYERS, SEQ = 128, 4, 96
# A 16-key window, so that most keys of a 96-token prompt go through N:M selection.
SPARSE = {"sparse_cfg": {"default": {"sparsity_n": 2, "sparsity_m": 4, "dense_window_size": 16}}}

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


# --------------------------------------------------------------------------------------
# examples/finetune_fsdp.py under torchrun
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_finetune(out: Path, *args: str, timeout: float) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores: no oversubscription
    # The script picks its attention backend itself; an inherited interpreter flag from the
    # test session must not turn the CPU run into interpreted Triton.
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), "--out", str(out), *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    summary_path = out / "summary.json"
    assert summary_path.is_file(), log
    return json.loads(summary_path.read_text())


def _check_summary(s: dict, steps: int) -> None:
    assert s["ok"] is True and not s["errors"], s["errors"]
    assert all(s["checks"].values()), s["checks"]
    assert set(s["checks"]) == {
        "same_init_on_all_ranks", "loss_decreased",
        "first_step_grads_match_single_process", "save_restore_logits_match",
    }
    assert s["world_size"] == 2
    assert len(s["losses"]) == steps and s["losses"][-1] < s["losses"][0]
    # The rank-averaged loss of step 1 is the single-process loss of the global batch.
    assert s["losses"][0] == pytest.approx(s["reference_first_loss"], rel=1e-5)
    g = s["grads"]
    assert g["max_rel_err"] <= g["rtol"] <= 1e-4
    assert g["params_compared"] == g["params_with_nonzero_grad"] > 0
    r = s["restore"]
    assert r["restored_vs_saved_bit_identical"] and r["restored_is_sparsified"]
    # 2:4 selection really ran: well below 1, above the 1/2 floor that the window lifts.
    assert 0.5 < r["kept_fraction"] < 0.9
    assert (Path(r["checkpoint"]) / "modelopt_sparse.json").is_file()


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_finetune_two_processes_cpu_gloo(tmp_path, strategy):
    s = _run_finetune(tmp_path / "out", "--backend", "gloo", "--device", "cpu", "--steps", "4",
                      "--strategy", strategy, timeout=300)
    _check_summary(s, steps=4)
    assert (s["strategy"], s["backend"], s["device"], s["attn_backend"]) == (strategy, "gloo", "cpu", "torch")


@pytest.mark.gpu
@two_gpus
def test_finetune_fsdp_two_gpus_nccl(tmp_path):
    s = _run_finetune(tmp_path / "out", "--backend", "nccl", "--device", "cuda", "--steps", "5", timeout=600)
    _check_summary(s, steps=5)
    assert (s["strategy"], s["backend"], s["attn_backend"]) == ("fsdp", "nccl", "triton")


# --------------------------------------------------------------------------------------
# The kernel on a GPU other than the current one
# --------------------------------------------------------------------------------------
def _gpu_inputs(device, seed=5):
    lens = [700, 129, 1]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), h, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    starts = torch.tensor([0, 700, 829], dtype=torch.int32, device=device)
    lengths = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, starts, lengths, max(lens)


@pytest.mark.gpu
@two_gpus
def test_kernel_launches_on_the_device_of_its_inputs():
    """With cuda:0 current, a call on cuda:1 tensors runs there and gives, bit for bit, what
    the same call gives on cuda:0 (same kernels, same GPU model), forward and backward."""
    kw = dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=2, dense_window_size=16, backend="triton")
    torch.cuda.set_device(0)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        q, k, v, s, l, m = _gpu_inputs(dev)
        out = attention(q, k, v, s, l, m, **kw)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev, out.dtype)
        out.backward(grad)
        assert out.device == q.grad.device == k.grad.device == torch.device(dev)
        assert torch.cuda.current_device() == 0
        results[dev] = [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        assert torch.isfinite(a.float()).all()
        assert torch.equal(a, b)


@pytest.mark.gpu
@two_gpus
def test_inputs_spread_over_two_gpus_are_rejected():
    q, k, v, s, l, m = _gpu_inputs("cuda:1")
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("cuda:0"), v, s, l, m, sparsity_n=2)
    with pytest.raises(ValueError, match="is on cuda:0 but q is on cuda:1"):
        attention(q, k, v, s.to("cuda:0"), l, m, sparsity_n=2)


# --------------------------------------------------------------------------------------
# Sharded inference with accelerate
# --------------------------------------------------------------------------------------
def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(_config()).save_pretrained(path)
    return path


def _split_map(first, second) -> dict:
    """Embeddings and the first half of the layers on ``first``, the rest on ``second``."""
    dm = {"model.embed_tokens": first, "model.rotary_emb": first}
    dm.update({f"model.layers.{i}": first if i < LAYERS // 2 else second for i in range(LAYERS)})
    dm.update({"model.norm": second, "lm_head": second})
    return dm


def _load_split(ckpt: Path, first, second, loader: str, dtype, offload_dir: Path, sparse=None):
    """The checkpoint split over two devices, by from_pretrained or by accelerate.dispatch_model.

    With ``sparse``, the model is sparsified: after loading for from_pretrained, before
    dispatching for dispatch_model, so both orders are covered.
    """
    device_map = _split_map(first, second)
    offload = {"offload_folder": str(offload_dir)} if "disk" in device_map.values() else {}
    if loader == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map=device_map, dtype=dtype, **offload).eval()
        return mts.sparsify(model, sparse) if sparse is not None else model
    from accelerate import dispatch_model

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    if sparse is not None:
        mts.sparsify(model, sparse)
    # skip_keys: as transformers' own dispatch, so that the KV cache is not moved by the hooks.
    return dispatch_model(
        model, device_map=device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None),
        **({"offload_dir": str(offload_dir)} if offload else {}),
    )


def _prompt(batch=2, length=SEQ, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, length), generator=gen).to(device)


@pytest.mark.parametrize("loader", ["from_pretrained", "dispatch_model"])
def test_sparsify_model_split_with_disk_offload(hf_checkpoint, tmp_path, loader):
    """CPU stand-in for a 2-GPU split: the second half lives on disk (meta until its hook loads it)."""
    whole = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    mts.sparsify(whole, SPARSE)
    split = _load_split(hf_checkpoint, "cpu", "disk", loader, torch.float32, tmp_path / "offload", SPARSE)
    assert any(p.device.type == "meta" for p in split.model.layers[-1].parameters())
    assert mts.print_summary(split, file=io.StringIO()).count("2:4") == LAYERS

    ids = _prompt()
    with torch.no_grad():
        expected = whole(input_ids=ids).logits
        got = split(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, dense, atol=1e-3), "2:4 selection changed nothing: the test is vacuous"
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(ids, **kwargs), whole.generate(ids, **kwargs))


def test_sparsify_on_meta_then_assign_weights(hf_checkpoint):
    """Conversion touches no tensor: a model built on ``meta`` converts, then takes real weights."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    with init_empty_weights():
        empty = LlamaForCausalLM(_config())
    mts.sparsify(empty, SPARSE)
    assert mts.is_sparsified(empty) and next(empty.parameters()).device.type == "meta"
    empty.load_state_dict(load_file(hf_checkpoint / "model.safetensors"), assign=True)
    empty.eval()

    whole = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    mts.sparsify(whole, SPARSE)
    assert mts.sparse_state(empty)["modules"] == mts.sparse_state(whole)["modules"]
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(empty(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_restore_from_pretrained_into_offloaded_model(hf_checkpoint, tmp_path):
    """The route for sharded inference of a sparse checkpoint: HF loads (and offloads) the weights."""
    whole = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    mts.sparsify(whole, SPARSE)
    whole.save_pretrained(tmp_path / "sparse_hf")
    split = _load_split(tmp_path / "sparse_hf", "cpu", "disk", "from_pretrained", torch.float32, tmp_path / "off")
    mts.restore_from_pretrained(split)
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(split(input_ids=ids).logits, whole(input_ids=ids).logits)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_restore_into_offloaded_model_loads_or_refuses(hf_checkpoint, tmp_path):
    torch.manual_seed(7)
    trained = LlamaForCausalLM(_config()).eval()  # other weights than hf_checkpoint
    mts.sparsify(trained, SPARSE)
    mts.save(trained, tmp_path / "ckpt")
    split = _load_split(hf_checkpoint, "cpu", "disk", "from_pretrained", torch.float32, tmp_path / "off")
    try:
        mts.restore(split, tmp_path / "ckpt")
    except ValueError as err:
        assert "meta device" in str(err)  # refusing, with the way out, is acceptable
        return
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(split(input_ids=ids).logits, trained(input_ids=ids).logits)


def _first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first generated step where two greedy runs disagree (None if never)."""
    differ = (a != b).any(0).nonzero()
    return int(differ[0]) if differ.numel() else None


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("loader", ["from_pretrained", "dispatch_model"])
def test_sparse_model_split_over_two_gpus(hf_checkpoint, tmp_path, loader):
    single = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.bfloat16, device_map={"": 0}).eval()
    mts.sparsify(single, SPARSE)
    split = _load_split(hf_checkpoint, 0, 1, loader, torch.bfloat16, tmp_path / "offload", SPARSE)
    devices = {p.device for p in split.parameters()}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}, devices
    assert {p.device for p in split.model.layers[-1].parameters()} == {torch.device("cuda", 1)}
    # auto on CUDA: the kernels choose per call (the Hopper engine for long prefills on sm_90).
    assert [row["backend"] for row in mts.conversion.summary_rows(split)] == ["auto"] * LAYERS

    ids = _prompt(device="cuda:0")
    with torch.no_grad():
        expected = single(input_ids=ids).logits.float().cpu()
        got = split(input_ids=ids).logits.float().cpu()
    # Same kernels on the same GPU model: equal up to bf16 rounding of the layer outputs.
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 2e-2 * scale

    steps = 8
    # min_new_tokens: an early EOS would shorten the runs (output_logits stays unprocessed).
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                  do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    out_split = split.generate(ids, **kwargs)
    out_single = single.generate(ids, **kwargs)
    seq_split, seq_single = out_split.sequences.cpu(), out_single.sequences.cpu()
    assert seq_split.shape == (ids.shape[0], SEQ + steps)
    assert torch.equal(seq_split[:, :SEQ], ids.cpu())
    # Greedy runs may part only at a near-tie of bf16 logits; up to there they agree.
    new_split, new_single = seq_split[:, SEQ:], seq_single[:, SEQ:]
    stop = _first_divergence(new_split, new_single)
    for step in range(steps if stop is None else stop + 1):
        a, b = out_split.logits[step].float().cpu(), out_single.logits[step].float().cpu()
        assert (a - b).abs().max().item() <= 2e-2 * scale, f"decode step {step}"
    if stop is not None:
        b = out_single.logits[stop].float().cpu()
        picked_split = b.gather(-1, new_split[:, stop, None])
        picked_single = b.gather(-1, new_single[:, stop, None])
        assert ((picked_single - picked_split).abs() <= 2e-2 * scale).all(), "diverged without a near-tie"
