"""`phijax plan`: the train (SFT, DPO, decode) step compiled for a TPU slice on this CPU host
(libtpu's compile-only devices), or for host CPU devices (`cpu-N`), or estimated for GPUs;
memory per device against the chip's HBM, FLOPs, collectives, roofline and cost.

Tests marked `tpu_plan` need libtpu (`pip install -e ".[tpu-plan]"`) and are skipped without it;
the others run everywhere."""
import importlib.util
import json

import pytest

from conftest import ROOT, needs_libtpu, run_cli

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY = ROOT / "configs" / "tiny.yaml"
GiB = 2 ** 30


def _plan(tmp_path, topology, *args, check=True):
    out = tmp_path / "plan.json"
    result = run_cli("plan", TINY, "--topology", topology, "--out", out, "data.synthetic=true",
                     *args, check=check)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def _error_line(result) -> str:
    """The one line an error leaves; nothing else but log lines may precede it."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- without a compile

def test_topology_names():
    from phijax.plan.chips import parse_topology

    cases = {"v5p-8": (4, "v5p:2x2x1"), "v5p-128": (64, "v5p:4x4x4"),
             "v5p-256": (128, "v5p:4x4x8"), "v5p-512": (256, "v5p:4x8x8"),
             "v6e-8": (8, "v6e:2x4"), "v6e-256": (256, "v6e:16x16"),
             "v5litepod-16": (16, "v5e:4x4"), "v4-8": (8, "v4:2x2x1"),
             "v5p:4x4x8": (128, "v5p:4x4x8")}
    for name, (devices, libtpu_name) in cases.items():
        topo = parse_topology(name)
        assert (topo.kind, topo.devices, topo.libtpu_name) == ("tpu", devices, libtpu_name), name
    assert parse_topology("v4-8").chips == 4  # a v4 chip compiles as two TensorCore devices
    assert (parse_topology("cpu-8").kind, parse_topology("h200x16").devices) == ("cpu", 16)
    from phijax.errors import ConfigError
    for bad in ("v5p-7", "v5p-2", "tpu-8", "v6e-12"):
        with pytest.raises(ConfigError, match="--topology"):
            parse_topology(bad)


HLO = """HloModule m, entry_computation_layout={()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,128]{1,0} all-gather(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true
  %s = f32[8,128]{1,0} slice(%ag), slice={[0:8], [0:128]}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %s)
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8,128]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[8,128]{1,0}) while(%t), condition=%cond, body=%body
  %y = f32[8,128]{1,0} get-tuple-element(%w), index=1
  ROOT %ar = f32[8,128]{1,0} all-reduce(%y), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
}
"""


def test_hlo_collectives_weighted_by_loop_trips():
    from phijax.plan.hlo import analyze

    result = analyze(HLO, {"data": 2, "fsdp": 4, "tensor": 1}, 8)
    rows = {r["op"]: r for r in result["collectives"]}
    gather, reduce = rows["all-gather"], rows["all-reduce"]
    assert (gather["axes"], gather["count"]) == ("fsdp", 3)  # in a loop of 3 trips
    assert gather["result_bytes"] == 3 * 32 * 128 * 4
    assert gather["wire_bytes"] == pytest.approx(3 * 32 * 128 * 4 * 3 / 4)  # ring: (n-1)/n
    assert (reduce["axes"], reduce["count"]) == ("data", 1)  # groups {0, 4}, {1, 5}, ...
    assert reduce["wire_bytes"] == pytest.approx(2 * 8 * 128 * 4 / 2)
    assert result["loop_trips"] == [3] and result["loop_factor"] > 1


KERNEL_HLO = """HloModule m, entry_computation_layout={()}

ENTRY %main (a: f32[8,128]) -> f32[32,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %k = f32[8,128]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="splash_mha_fwd"}
  ROOT %ag = f32[32,128]{1,0} all-gather(%k), replica_groups=[1,4]<=[4], dimensions={0}
}
"""


def test_hlo_reads_a_kernel_whose_metadata_spans_lines():
    from phijax.plan.hlo import analyze

    result = analyze(KERNEL_HLO, {"data": 1, "fsdp": 4, "tensor": 1}, 4)
    assert result["custom_calls"] == {"tpu_custom_call": 1}
    assert [r["op"] for r in result["collectives"]] == ["all-gather"]  # the line after it


def test_search_candidates():
    from phijax.plan.search import mesh_shapes, microbatch_counts

    shapes = mesh_shapes(8)
    assert len(shapes) == 10 and all(d * f * t == 8 for d, f, t in shapes)
    assert shapes[0] == (1, 8, 1)  # the most fsdp first
    assert microbatch_counts(5760, 64) == [1, 2, 3, 5, 6, 9, 10, 15, 18, 30, 45, 90]
    assert microbatch_counts(16, 3) == [1]  # the batch does not divide: validate says why


def test_out_of_memory_becomes_one_line():
    from phijax.plan.compile import out_of_memory

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (66.33T) exceeds available HBM (95.74G).")
    line = out_of_memory(message, "configs/phi-4.yaml", "v5p-128")
    assert line.startswith("configs/phi-4.yaml does not fit v5p-128: 66.33T > 95.74G of HBM "
                           "per device (HLO temporaries")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here; this checks its absence")
def test_a_tpu_topology_without_libtpu_is_one_line(tmp_path):
    result, plan = _plan(tmp_path, "v5p-8", "mesh.fsdp=4", check=False)
    assert _error_line(result) == ('phijax: error: phijax plan --topology v5p-8 needs libtpu: '
                                   'pip install -e ".[tpu-plan]"')
    assert plan is None


def test_a_mesh_that_does_not_use_the_topology_is_one_line(tmp_path):
    result, _ = _plan(tmp_path, "cpu-8", check=False)
    line = _error_line(result)
    assert "mesh data*fsdp*tensor = 1*1*1 = 1 does not match the 8" in line
    assert "mesh.data, mesh.fsdp and mesh.tensor to multiply to 8" in line


# ---------------------------------------------------------------- host CPU devices, GPUs

def test_cpu_topology_plans_on_host_devices(tmp_path):
    result, plan = _plan(tmp_path, "cpu-4", "mesh.fsdp=4")
    m = plan["memory"]
    assert plan["devices"] == 4 and plan["kind"] == "cpu"
    assert min(m["params_bytes"], m["optimizer_bytes"], m["temporaries_bytes"],
               m["peak_bytes"]) > 0
    assert m["optimizer_bytes"] == pytest.approx(2 * m["params_bytes"], rel=0.01)  # Adam
    assert {r["axes"] for r in plan["collectives"]} == {"fsdp"}
    assert plan["compute"]["matmul_flops_per_device"] > 0
    assert "memory per device" in result.stdout and "collectives per step" in result.stdout


def test_gpu_topologies_are_an_analytic_estimate(tmp_path):
    result, plan = _plan(tmp_path, "h100x8", "mesh.fsdp=8", "--tokens", "1B")
    assert "analytic estimate" in result.stdout
    assert plan["analytic"] and "temporaries_bytes" not in plan["memory"]
    assert plan["memory"]["hbm_bytes"] == 80e9 and plan["memory"]["params_bytes"] > 0
    r = plan["roofline"]
    assert r["bound"] == "compute" and r["mfu"] > 0
    assert plan["cost"]["chip_days"] == pytest.approx(plan["cost"]["days"] * 8)


def test_search_picks_the_fewest_microbatches_that_fit(tmp_path):
    # The tiny model on 2 CPU devices: one microbatch of 8 rows per device peaks at 52 MiB,
    # two of 4 rows at 30 MiB.
    result, plan = _plan(tmp_path, "cpu-2", "mesh.fsdp=2", "--search", "microbatches",
                         "--hbm", "45MiB", "--headroom", "0")
    assert plan["train"]["microbatches"] == 2, result.stdout
    first, second = plan["search"][:2]
    assert first["microbatches"] == 1 and first["rejected"].startswith("out of memory")
    assert second["microbatches"] == 2 and "rejected" not in second
    assert "rejected  mesh 1x2x1 remat none microbatches 1: out of memory" in result.stdout


def _plans(overrides: tuple, *steps) -> dict:
    """In this process: each step's plan of the tiny config on 2 host devices."""
    from phijax.config import load_config
    from phijax.plan.build import make_plan
    from phijax.plan.chips import parse_topology

    cfg = load_config(TINY, ["data.synthetic=true", "train.peak_flops_per_device=1e11",
                             *overrides])
    return {s: make_plan(cfg, parse_topology("cpu-2"), "tiny", step=s) for s in steps}


@pytest.mark.slow
def test_sft_and_dpo_steps_plan_as_their_commands_build_them():
    plans = _plans(("mesh.fsdp=2", "train.batch_size=2", "data.seq_len=64"),
                   "train", "sft", "dpo")
    train, sft, dpo = (plans[s]["memory"] for s in ("train", "sft", "dpo"))
    for m in (train, dpo):
        for key in ("params_bytes", "optimizer_bytes", "argument_bytes", "temporaries_bytes",
                    "peak_bytes"):
            assert m[key] > 0, key
    assert sft == train  # phijax sft trains the LM step (assistant tokens by loss weights)
    # DPO's step holds the policy alone, its batch a chosen and a rejected row per pair: the
    # reference model's log-probs are computed before training, in a pass of their own
    assert (dpo["params_bytes"], dpo["optimizer_bytes"]) == (train["params_bytes"],
                                                             train["optimizer_bytes"])
    tokens = {s: plans[s]["model"]["tokens_per_step"] for s in plans}
    assert tokens["dpo"] == 2 * tokens["train"]
    assert dpo["temporaries_bytes"] > train["temporaries_bytes"]
    reference = plans["dpo"]["before"]["DPO reference pass"]
    assert reference["params_bytes"] == train["params_bytes"]
    assert reference["params_bytes"] < reference["peak_bytes"] < dpo["peak_bytes"]
    assert plans["dpo"]["step"] == "dpo" and plans["sft"]["train"]["seq_len"] == 64


def test_decode_step_plans_its_kv_cache_and_roofline(tmp_path):
    result, plan = _plan(tmp_path, "cpu-2", "mesh.fsdp=2", "--step", "decode", "--batch", "8",
                         "--cache-len", "256")
    m, c, r = plan["memory"], plan["compute"], plan["roofline"]
    # 2 layers x (keys, values) x 8 rows x 2 KV heads x head_dim 32 x 256 slots x float32,
    # rows split over the 2 devices
    assert m["kv_cache_bytes"] == 2 * 2 * 8 * 2 * 32 * 256 * 4 / 2
    assert m["params_bytes"] > 0 and m["peak_bytes"] > m["params_bytes"] + m["kv_cache_bytes"]
    assert "optimizer_bytes" not in m and m["alias_bytes"] == m["kv_cache_bytes"]  # donated
    assert c["hbm_bytes_per_device"] == m["params_bytes"] + m["kv_cache_bytes"]
    assert c["attention_flops_per_device"] == 4 * 2 * 4 * 32 * 256 * 8 / 2
    assert c["matmul_flops_per_device"] > 0
    assert plan["decode"] == {"batch": 8, "cache_len": 256, "dtype": "float32"}
    assert r["tokens_per_s"] == pytest.approx(8 / r["step_s"])
    assert "KV cache" in result.stdout and "(decode step)" in result.stdout


def test_decode_flags_on_a_training_step_are_one_line(tmp_path):
    result, _ = _plan(tmp_path, "cpu-2", "mesh.fsdp=2", "--cache-len", "256", check=False)
    assert _error_line(result) == ("phijax: error: --cache-len sizes the decode step (--step "
                                   "decode); training steps take train.batch_size and "
                                   "data.seq_len")


# ---------------------------------------------------------------- TPU slices through libtpu

@pytest.mark.tpu_plan
@needs_libtpu
@pytest.mark.parametrize("topology,mesh,hbm_gib", [
    ("v5p-8", ("mesh.fsdp=4",), 95.74), ("v6e-8", ("mesh.data=2", "mesh.fsdp=4"), 31.25)])
def test_tiny_compiles_for_a_tpu_slice(tmp_path, topology, mesh, hbm_gib):
    result, plan = _plan(tmp_path, topology, *mesh, "--tokens", "1B")
    m = plan["memory"]
    for key in ("params_bytes", "optimizer_bytes", "argument_bytes", "output_bytes",
                "temporaries_bytes", "peak_bytes"):
        assert m[key] > 0, key
    assert m["hbm_bytes"] / GiB == pytest.approx(hbm_gib, abs=0.01)
    assert f"{hbm_gib:.2f} GiB HBM" in result.stdout
    assert 0.9 < m["headroom"] < 1
    assert plan["compute"]["xla_flops"] > 0 and plan["compute"]["loop_factor"] > 1
    assert "fsdp" in {r["axes"] for r in plan["collectives"]}
    r = plan["roofline"]
    assert r["step_s"] > 0 and 0 < r["mfu"] < 1 and plan["cost"]["chip_days"] > 0
    assert "compiling the train step for " + topology in result.stderr
    assert "tpu_custom_call" not in plan["compute"]["custom_calls"]  # XLA attention: no kernel


@pytest.mark.tpu_plan
@needs_libtpu
def test_decode_step_compiles_for_a_tpu_slice(tmp_path):
    # rows split over 4 devices, the weights whole on each: HBM-bound, no collectives
    result, plan = _plan(tmp_path, "v5p-8", "mesh.data=4", "--step", "decode", "--batch", "16",
                         "--cache-len", "1024")
    m, r = plan["memory"], plan["roofline"]
    assert m["kv_cache_bytes"] == 2 * 2 * 16 * 2 * 32 * 1024 * 4 / 4
    assert m["hbm_bytes"] / GiB == pytest.approx(95.74, abs=0.01) and 0.9 < m["headroom"] < 1
    assert m["peak_bytes"] >= m["params_bytes"] + m["kv_cache_bytes"]
    assert r["bound"] == "hbm"
    assert r["hbm_s"] == pytest.approx((m["params_bytes"] + m["kv_cache_bytes"]) / 2765e9)
    assert r["tokens_per_s"] == pytest.approx(16 / r["step_s"])
    assert "compiling a decode step for v5p-8" in result.stderr


@pytest.mark.tpu_plan
@needs_libtpu
def test_a_model_over_the_hbm_is_one_line(tmp_path):
    big = ("model.hidden_size=8192", "model.intermediate_size=32768",
           "model.num_hidden_layers=48", "model.num_attention_heads=64",
           "model.num_key_value_heads=8", "mesh.fsdp=4")
    result, plan = _plan(tmp_path, "v5p-8", *big, check=False)
    line = _error_line(result)
    assert line.startswith(f"phijax: error: {TINY} does not fit v5p-8: ")
    assert "> 95.74G of HBM per device" in line
    assert plan is None
