"""The compiled CPU kernels against dequantize-then-matmul, on every path this CPU has.

The kernels quantize each activation row to int8 per weight group (scale absmax/127, round half
to even) before the integer dot products. The reference does the same in torch and then a
float64 matmul with the dequantized weights, so the only difference left is float summation
order: agreement is asserted to 1e-5 of the output's magnitude. A second, looser check bounds
the activation quantization's own error against the plain fp32 product.
"""
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from tinyv.kernels import native
from tinyv.kernels.linear import QuantLinear
from tinyv.kernels.quant import QuantConfig, dequantize_weight, quantize_weight

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(autouse=True)
def _default_kernel_setting(monkeypatch):
    """Tests pick a path per Kernels object (``setting=``), or set TINYV_KERNELS themselves."""
    monkeypatch.delenv("TINYV_KERNELS", raising=False)


def use(path, monkeypatch):
    """TINYV_KERNELS for the Kernels (and engines) opened after this."""
    monkeypatch.setenv("TINYV_KERNELS", path)


def opened(setting="auto", threads=2) -> native.Kernels:
    kernels = native.open_kernels(threads, setting=setting)
    assert kernels is not None, f"the compiled kernels must be built for the tests: {native.describe(None, setting)}"
    return kernels


def isas():
    """The paths this CPU can run (the scalar one always), as settings."""
    opened()
    have = native.cpu_features()
    return [setting for setting, isa in native.PATH_OF_SETTING.items() if isa == "scalar" or isa in have]


ISA_OF_SETTING = native.PATH_OF_SETTING


def quantized_activation(x: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel multiplies: x rounded to int8 per group of ``group`` columns, as floats."""
    m, k = x.shape
    g = x.reshape(m, k // group, group)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(m, k)


def reference(x, stored, cfg, bias, gelu=False):
    w = dequantize_weight(stored, cfg).double()
    y = quantized_activation(x, cfg.group_size).double() @ w.T
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.float()


def check(y, ref, tol=1e-5):
    scale = ref.abs().max().item() or 1.0
    err = (y - ref).abs().max().item() / scale
    assert err <= tol, f"max error {err:.3g} of the output's magnitude"


SHAPES = [  # (M, N, K): K not a multiple of 128/256, N not a multiple of 16, M over 1..600
    (1, 1, 32), (1, 37, 96), (1, 29, 2560 + 64 + 32), (2, 70, 160), (3, 33, 288), (5, 129, 2560 + 32), (7, 16, 384),
    (1, 300, 1024), (17, 45, 640), (64, 64, 256), (600, 24, 224),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_path_matches_dequantize_then_matmul(bits, group, monkeypatch):
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    for path in isas():
        by_threads = {threads: opened(path, threads) for threads in (1, 2, 3, 4)}
        assert {k.isa for k in by_threads.values()} == {ISA_OF_SETTING[path]}
        for m, n, k in SHAPES:
            if k % group:
                continue
            w = torch.randn(n, k, generator=gen) * 0.05
            cfg = QuantConfig(bits, group)
            stored = quantize_weight(w, cfg)
            x = torch.randn(m, k, generator=gen)
            bias = torch.randn(n, generator=gen)
            for kernels in by_threads.values():
                y = kernels.qgemm(x, stored["qweight"], stored["scales"], bits, group, bias)
                check(y, reference(x, stored, cfg, bias))
            y = by_threads[2].qgemm(x, stored["qweight"], stored["scales"], bits, group, None, gelu=True)
            check(y, reference(x, stored, cfg, None, gelu=True))


@pytest.mark.parametrize("bits", [4, 8])
def test_misaligned_and_strided_inputs(bits):
    """Activation rows at odd addresses and strides, weights at an odd byte offset."""
    gen = torch.Generator().manual_seed(7)
    cfg = QuantConfig(bits, 32)
    n, k = 53, 352
    stored = quantize_weight(torch.randn(n, k, generator=gen), cfg)
    big = torch.empty(stored["qweight"].numel() + 1, dtype=stored["qweight"].dtype)
    shifted = big[1:].view(stored["qweight"].shape)  # one byte off any alignment
    shifted.copy_(stored["qweight"])
    buf = torch.randn(5, k + 3, generator=gen)
    x = buf[:, 1 : k + 1]  # rows 4 bytes off and a row stride of k + 3
    for path in isas():
        for rows in (x, x[2:3]):  # M > 1 and the decode path's M = 1
            y = opened(path).qgemm(rows, shifted, stored["scales"], bits, 32, None)
            check(y, reference(rows.contiguous(), stored, cfg, None))


def test_activation_quantization_error_is_small():
    """Against the plain fp32 product: int8 activations per group of 32 cost ~40 dB."""
    from tinyv.kernels.quant import sqnr_db

    gen = torch.Generator().manual_seed(3)
    cfg = QuantConfig(8, 32)
    stored = quantize_weight(torch.randn(256, 1024, generator=gen), cfg)
    x = torch.randn(4, 1024, generator=gen)
    exact = x @ dequantize_weight(stored, cfg).T
    y = opened().qgemm(x, stored["qweight"], stored["scales"], 8, 32)
    assert sqnr_db(exact, y) > 35


def test_quant_linear_uses_the_kernels_and_falls_back(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    cfg = QuantConfig(4, 32)
    w, b = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    stored = quantize_weight(w, cfg)
    lin = QuantLinear(128, 96, cfg, stored, b, kernels=opened())
    x = torch.randn(2, 3, 128, generator=gen)
    assert lin.native()
    check(lin(x), reference(x.reshape(6, 128), stored, cfg, b).reshape(2, 3, 96))
    check(lin.forward_gelu(x), reference(x.reshape(6, 128), stored, cfg, b, gelu=True).reshape(2, 3, 96))
    use("torch", monkeypatch)
    kernels = native.open_kernels()
    assert kernels is None and "TINYV_KERNELS=torch" in native.describe(kernels)
    assert "'torch'" in native.describe(None, setting="torch")
    lin = QuantLinear(128, 96, cfg, stored, b, kernels=kernels)
    assert not lin.native()
    exact = x @ dequantize_weight(stored, cfg).T + b
    torch.testing.assert_close(lin(x), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.forward_gelu(x), F.gelu(exact, approximate="tanh"), rtol=1e-5, atol=1e-4)


def test_describe_names_the_path(monkeypatch):
    for path in isas():
        kernels = opened(path)
        assert kernels.isa == ISA_OF_SETTING[path]
        assert native.describe(kernels).startswith("native " + ISA_OF_SETTING[path])
        use(path, monkeypatch)  # the same through TINYV_KERNELS
        assert native.open_kernels().isa == ISA_OF_SETTING[path]


def test_a_forced_path_is_capped_to_what_the_cpu_has():
    """A path above the CPU's best in its family runs the best; another architecture's path (NEON
    on x86-64, AVX on arm64) runs the scalar one rather than an instruction the CPU lacks."""
    have = native.cpu_features()
    best = opened().isa
    arm = any(isa.startswith("neon") for isa in have)
    family = ["neon", "neon-dotprod", "neon-i8mm"] if arm else ["avx2", "avx512"]
    foreign = ["avx2", "avx512"] if arm else ["neon", "neon-dotprod", "neon-i8mm"]
    if have:  # the top of this CPU's family gives its best path, whatever that is
        assert opened(family[-1]).isa == best
    for setting in foreign:
        kernels = opened(setting)
        assert kernels.isa == "scalar", setting
        assert native.describe(kernels).startswith("native scalar")


def test_an_unknown_kernel_setting_is_an_error_not_a_slow_fallback(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tinyv.cli.main import cli
    from tinyv.errors import TinyVError

    use("avx9000", monkeypatch)
    for call in (native.open_kernels, native.unavailable_reason, lambda: native.describe(None), native.check_setting):
        with pytest.raises(TinyVError, match="TINYV_KERNELS='avx9000' is not one of auto, torch"):
            call()
    result = CliRunner().invoke(cli, ["caption", os.path.join(EXAMPLES, "three_shapes.png")])
    assert result.exit_code == 1 and "TINYV_KERNELS='avx9000' is not one of" in result.output
    from tinyv.demo.builtin import NOTE  # no bundle named: the demo model's note comes first

    lines = [ln for ln in result.output.strip().splitlines() if ln != NOTE]
    assert len(lines) == 1 and "Traceback" not in result.output
    with pytest.raises(TinyVError, match="'avx9000' is not one of"):
        native.open_kernels(setting="avx9000")
    use("AVX2 ", monkeypatch)  # case and spaces are forgiven
    assert native.open_kernels() is not None and native.unavailable_reason() is None


def test_missing_library_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_library_path", lambda: None)
    assert native.open_kernels() is None and native.cpu_features() == []
    assert "not installed" in native.unavailable_reason()
    assert "not installed" in native.describe(None)


def test_forked_child_gets_its_own_threads():
    """The thread pool does not survive fork(): a child process must rebuild it, not hang."""
    gen = torch.Generator().manual_seed(9)
    stored = quantize_weight(torch.randn(256, 256, generator=gen), QuantConfig(4, 32))
    x = torch.randn(1, 256, generator=gen)
    kernels = opened(threads=2)
    want = kernels.qgemm(x, stored["qweight"], stored["scales"], 4, 32)
    pid = os.fork()
    if pid == 0:  # child: same call, then report through the exit status
        ok = torch.equal(kernels.qgemm(x, stored["qweight"], stored["scales"], 4, 32), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_two_kernels_objects_run_side_by_side_without_cross_talk():
    """Two Kernels objects with different thread counts (and ISAs, where the CPU has two) called
    at the same time from two Python threads (ctypes releases the GIL) give exactly what each
    gives alone: no pool, ISA or lock is shared between them."""
    paths = isas()
    a, b = opened(paths[-1], threads=2), opened(paths[-2] if len(paths) > 1 else paths[0], threads=3)
    gen = torch.Generator().manual_seed(13)
    cases = []
    for bits, (m, n, k) in ((4, (1, 256, 512)), (8, (7, 130, 384)), (4, (17, 96, 640))):
        stored = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, QuantConfig(bits, 32))
        cases.append((torch.randn(m, k, generator=gen), stored, bits))

    def run(kernels):
        return [kernels.qgemm(x, st["qweight"], st["scales"], bits, 32) for x, st, bits in cases]

    alone = {id(k): run(k) for k in (a, b)}
    if a.isa != b.isa:  # the ISAs sum in different orders: a leaked ISA would show
        assert any(not torch.equal(p, q) for p, q in zip(alone[id(a)], alone[id(b)]))
    start, problems = threading.Barrier(2), []

    def hammer(kernels):
        try:
            start.wait()
            for _ in range(30):
                if not all(torch.equal(got, want) for got, want in zip(run(kernels), alone[id(kernels)])):
                    problems.append(f"{kernels!r} differs from its result alone")
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            problems.append(f"{kernels!r}: {e!r}")

    workers = [threading.Thread(target=hammer, args=(k,)) for k in (a, b)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not problems, problems


def test_quant_linear_route_is_fixed_at_construction(monkeypatch):
    """A layer built without kernels stays on the torch path beside native ones, and a native
    layer does not re-read TINYV_KERNELS when it runs; fp16 weights never go to the int kernels."""
    gen = torch.Generator().manual_seed(17)
    cfg = QuantConfig(4, 32)
    w, b = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    stored = quantize_weight(w, cfg)
    kernels = opened()
    on_torch = QuantLinear(64, 48, cfg, stored, b)
    on_kernels = QuantLinear(64, 48, cfg, stored, b, kernels=kernels)
    fp16 = QuantLinear(64, 48, QuantConfig(16, 32), {"weight": w.half()}, b, kernels=kernels)
    assert (on_torch.native(), on_kernels.native(), fp16.native()) == (False, True, False)
    assert "route=torch" in repr(on_torch) and f"route={kernels.isa}" in repr(on_kernels)

    calls = []
    real_qgemm = native.Kernels.qgemm
    monkeypatch.setattr(native.Kernels, "qgemm", lambda self, *a, **k: calls.append(1) or real_qgemm(self, *a, **k))
    use("torch", monkeypatch)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(on_torch(x), on_torch.reference_forward(x)) and calls == []
    fp16(x)
    assert calls == []
    assert torch.equal(on_kernels(x), real_qgemm(kernels, x, stored["qweight"], stored["scales"], 4, 32, b))
    assert calls == [1]


def test_kernels_threads_and_close():
    torch_threads = torch.get_num_threads()
    assert native.open_kernels().threads == torch_threads  # None: torch's count when opened
    kernels = opened(threads=3)
    assert kernels.threads == 3 and "threads=3" in repr(kernels)
    stored = quantize_weight(torch.randn(64, 64), QuantConfig(8, 32))
    x = torch.randn(2, 64)
    kernels.qgemm(x, stored["qweight"], stored["scales"], 8, 32)
    kernels.close()
    kernels.close()  # idempotent
    assert "closed" in repr(kernels)
    with pytest.raises(RuntimeError, match="closed"):
        kernels.qgemm(x, stored["qweight"], stored["scales"], 8, 32)


# -- the engine on tiny bundles: native kernels vs the torch path ---------------------------------

@pytest.fixture(scope="module")
def tiny_bundles(tiny_bundle):
    return {bits: tiny_bundle(bits) for bits in (4, 8)}


def _engine_run(bundle, image, mode, monkeypatch):
    """Greedy tokens for a caption and a question, and the teacher-forced logits of the first."""
    from tinyv.engine.engine import Engine
    from tinyv.engine.generate import build_prompt_embeds

    use(mode, monkeypatch)
    engine = Engine.load(bundle, threads=2, cache_dir=None)
    tokens = [[s.token for s in engine.stream(image, question=q, max_new_tokens=16) if s.token is not None]
              for q in (None, "what colour is the circle?")]
    return engine, tokens


@pytest.mark.parametrize("bits", [4, 8])
def test_engine_greedy_tokens_native_vs_torch(bits, tiny_bundles, scene, monkeypatch):
    """Same greedy tokens on the 8-bit bundle. On the 4-bit one the tiny RANDOM model's nearly
    flat next-token distributions let the int8 activations flip a late argmax (seen at token 16
    of 24 on the question), so there the first 12 tokens must match and the teacher-forced
    prefill (the M > 1 kernels) must agree on ≥ 90% of the generated positions with a small KL."""
    from tinyv.engine.generate import build_prompt_embeds
    from tinyv.engine.prompts import build_prompt

    n = torch.get_num_threads()
    try:
        e_torch, t_torch = _engine_run(tiny_bundles[bits], scene, "torch", monkeypatch)
        e_native, t_native = _engine_run(tiny_bundles[bits], scene, "auto", monkeypatch)
        assert e_native.phi.layers[0].mlp.fc1.native() and e_native.kernels is not None
        assert e_torch.kernels is None and not e_torch.phi.layers[0].mlp.fc1.native()
        if bits == 8:
            assert t_native == t_torch
        else:
            assert [t[:12] for t in t_native] == [t[:12] for t in t_torch]
        with torch.inference_mode():
            img, _ = e_native.encode_image(scene, use_cache=False)
            x = build_prompt_embeds(e_native.phi, e_native.tokenizer, build_prompt(4), img)
            seq = torch.cat([x, e_native.phi.embed(torch.tensor([t_torch[0]]))], dim=1)
            at = slice(x.shape[1] - 1, None)  # the positions that predict the generated tokens
            q = e_native.phi.logits(e_native.phi(seq)[0, at]).log_softmax(-1)
            r = e_torch.phi.logits(e_torch.phi(seq)[0, at]).log_softmax(-1)
        kl = (r.exp() * (r - q)).sum(-1)
        agree = (q.argmax(-1) == r.argmax(-1)).float().mean().item()
        assert agree >= (1.0 if bits == 8 else 0.9), agree
        assert kl.mean().item() < (1e-3 if bits == 8 else 0.05), kl.mean().item()
    finally:
        torch.set_num_threads(n)


def test_long_8bit_prefill_goes_to_bf16_matmul_where_the_cpu_has_bf16(monkeypatch):
    """M >= 256 rows of an 8-bit layer: dequantize to bf16 + bf16 matmul (faster than the int8
    kernel there), only on the auto path of a CPU with bf16 units (decided when the Kernels object
    is opened); the result stays close to exact."""
    gen = torch.Generator().manual_seed(11)
    cfg = QuantConfig(8, 32)
    w, b = torch.randn(2100, 96, generator=gen) * 0.05, torch.randn(2100, generator=gen)  # > ROW_BLOCK rows
    stored = quantize_weight(w, cfg)
    exact = lambda x: x @ dequantize_weight(stored, cfg).T + b  # noqa: E731
    calls = []
    monkeypatch.setattr(QuantLinear, "bf16_forward", lambda self, x: calls.append(x.shape) or exact(x))

    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with_bf16 = opened()
    assert with_bf16.bf16_prefill_rows == 256
    lin = QuantLinear(96, 2100, cfg, stored, b, kernels=with_bf16)
    lin(torch.randn(2, 100, 96, generator=gen))  # 200 rows: the int8 kernel
    lin.forward_gelu(torch.randn(300, 96, generator=gen))
    assert calls == [(300, 96)]
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx2"})  # no bf16 units
    assert lin.bf16_rows == 256  # the layer keeps the route it was built with
    lin = QuantLinear(96, 2100, cfg, stored, b, kernels=opened())
    assert lin.bf16_rows is None
    lin(torch.randn(300, 96, generator=gen))
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512_bf16"})
    forced = opened("avx512")  # a forced kernel path is never rerouted
    assert forced.bf16_prefill_rows is None
    QuantLinear(96, 2100, cfg, stored, b, kernels=forced)(torch.randn(300, 96, generator=gen))
    four_bit = QuantConfig(4, 32)  # 4-bit stays native at any length
    assert QuantLinear(96, 2100, four_bit, quantize_weight(w, four_bit), b, kernels=with_bf16).bf16_rows is None
    assert calls == [(300, 96)]
    monkeypatch.undo()

    x = torch.randn(3, 300, 96, generator=gen)
    got, want = lin.bf16_forward(x), exact(x)
    assert got.shape == want.shape == (3, 300, 2100) and got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()) < 1e-2  # bf16 rounding of x, w and the output


def test_export_checks_the_kernel_setting_before_any_work(monkeypatch, tmp_path):
    """The export's quality gate runs the kernels: a bad TINYV_KERNELS must stop it first, not after
    minutes of vision export (the checkpoint paths here do not even exist)."""
    from click.testing import CliRunner

    from tinyv.cli.main import cli

    use("avx9000", monkeypatch)
    missing = str(tmp_path / "nothing")
    r = CliRunner().invoke(cli, ["export", "--phi2", missing, "--vit", missing, "--qformer", missing,
                                 "--stage", missing, "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "TINYV_KERNELS='avx9000' is not one of" in r.output
    assert os.listdir(tmp_path) == []
