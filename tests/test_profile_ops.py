"""memorizing.tools.profile_ops: ops are classified by what they compute (not by
their operands' names), and a CPU trace of a jitted step is read back per class."""
import jax
import jax.numpy as jnp

from memorizing.tools import profile_ops


def test_classify_names_gpu_ops_by_kind():
  c = profile_ops.classify
  assert c("custom-call __cublas$lt$matmul") == "matmul"
  assert c("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
  assert c("custom-call __cudnn$fmhaSoftmax") == "attention (cuDNN / flash)"
  assert c("fusion parameter dot") == "matmul"
  assert c("custom-call TopK") == "top-k / sort"
  assert c("fusion parameter dynamic-update-slice") == (
      "memory write (scatter / dynamic-update-slice)")
  assert c("loop_transpose_fusion") == "copy / transpose"
  assert c("fusion parameter add multiply") == "other fusion"
  assert c("bitcast") == profile_ops.OTHER
  # The device search's Pallas kernel as the H200 trace named it (commit 5131a8c).
  assert c("_bucket_kernel") == "Pallas / Triton kernel"
  assert c("_retrieved_fwd_kernel") == c("_retrieved_bwd_kernel") == "Pallas / Triton kernel"


def test_hlo_index_reads_a_fusions_body_not_its_operand_names():
  hlo = "\n".join([
      "HloModule jit_f, entry_computation_layout={(f32[4,4]{1,0})->f32[4,4]{1,0}}",
      "%fused_dot (p0: f32[4,4]) -> f32[4,4] {",
      "  %p0 = f32[4,4]{1,0} parameter(0)",
      "  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p0), lhs_contracting_dims={1}, "
      'rhs_contracting_dims={0}, metadata={op_name="jit(f)/sort_like"}',
      "}",
      "ENTRY %main (x: f32[4,4]) -> f32[4,4] {",
      "  %x = f32[4,4]{1,0} parameter(0)",
      "  %sort.3 = f32[4,4]{1,0} fusion(%x), kind=kOutput, calls=%fused_dot",
      "  ROOT %slice.2 = f32[4,4]{1,0} slice(%sort.3), slice={[0:4], [0:4]}",
      "}"])
  index = profile_ops.hlo_index(hlo)
  assert profile_ops.classify(index["sort.3"]) == "matmul"        # its body holds the dot
  assert "sort" not in index["slice.2"]                          # an operand's name
  assert profile_ops.classify(index["slice.2"]) == profile_ops.OTHER


def test_cpu_trace_of_a_jitted_step_is_split_by_class(tmp_path):
  @jax.jit
  def step(a, b):
    scores = a @ b
    values, _ = jax.lax.top_k(scores, 4)
    return values.sum()
  a = jax.random.normal(jax.random.PRNGKey(0), (128, 128))
  b = jax.random.normal(jax.random.PRNGKey(1), (128, 4096))
  prof = profile_ops.trace_ops(lambda: step(a, b), steps=2, log_dir=str(tmp_path),
                               hlo_text=step.lower(a, b).compile().as_text())
  classes = prof["ms_per_step"]
  assert classes.get("matmul", 0) > 0 and classes.get("top-k / sort", 0) > 0
  assert abs(sum(classes.values()) - prof["total_ms_per_step"]) < 1e-6
  table = profile_ops.class_table({"step": prof})
  assert "| matmul | " in table and "**all ops**" in table


def test_gpu_event_is_classed_by_its_long_name_without_operand_names():
  from types import SimpleNamespace
  gemm = SimpleNamespace(name="custom-call.7", stats=[(
      "long_name", '%custom-call.7 = bf16[8,8]{1,0} custom-call(%sort.2, %p1), '
      'custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/sort"}')])
  slice_of_sort = SimpleNamespace(name="slice.4", stats=[(
      "long_name", "%slice.4 = f32[4]{0} slice(%sort.2), slice={[0:4]}")])
  assert profile_ops.classify(profile_ops._event_text(gemm, {})) == "matmul"
  assert profile_ops.classify(profile_ops._event_text(slice_of_sort, {})) == profile_ops.OTHER


def test_hlo_details_name_what_a_fusion_computes_with_shapes():
  hlo = "\n".join([
      "HloModule jit_f",
      "%fused_gather (p0: bf16[8,16], p1: s32[4,1]) -> bf16[16,4] {",
      "  %p0 = bf16[8,16]{1,0} parameter(0)",
      "  %p1 = s32[4,1]{1,0} parameter(1)",
      "  %gather.1 = bf16[4,16]{1,0} gather(%p0, %p1), offset_dims={1}, "
      'collapsed_slice_dims={0}, metadata={op_name="jit(f)/x"}',
      "  ROOT %transpose.2 = bf16[16,4]{1,0} transpose(%gather.1), dimensions={1,0}",
      "}",
      "ENTRY %main (x: bf16[8,16], i: s32[4,1]) -> bf16[16,4] {",
      "  %x = bf16[8,16]{1,0} parameter(0)",
      "  %i = s32[4,1]{1,0} parameter(1)",
      "  ROOT %input_transpose_fusion = bf16[16,4]{1,0} fusion(%x, %i), kind=kInput, "
      "calls=%fused_gather",
      "}"])
  details = profile_ops.hlo_details(hlo, ["input_transpose_fusion", "missing"])
  assert details == {"input_transpose_fusion":
                     "bf16[16,4] fusion | bf16[4,16] gather; bf16[16,4] transpose"}


def test_hlo_details_find_a_gpu_trace_name_whose_dot_became_an_underscore():
  # GPU traces name ops as their kernels are named: HLO's "fusion.18" is "fusion_18"
  hlo = "\n".join([
      "HloModule jit_f",
      "%fused_reduce (p0: f32[8,16]) -> f32[8] {",
      "  %p0 = f32[8,16]{1,0} parameter(0)",
      "  %zero = f32[] constant(0)",
      "  ROOT %reduce.3 = f32[8]{0} reduce(%p0, %zero), dimensions={1}, to_apply=%add",
      "}",
      "ENTRY %main (x: f32[8,16]) -> f32[8] {",
      "  %x = f32[8,16]{1,0} parameter(0)",
      "  ROOT %input_add_reduce_fusion.18 = f32[8]{0} fusion(%x), kind=kInput, "
      "calls=%fused_reduce",
      "}"])
  details = profile_ops.hlo_details(hlo, ["input_add_reduce_fusion_18", "other_fusion_18"])
  assert details == {"input_add_reduce_fusion_18": "f32[8] fusion | f32[8] reduce"}
  assert profile_ops.hlo_name("input_add_reduce_fusion.18", {"input_add_reduce_fusion.18": 1}) \
      == "input_add_reduce_fusion.18"
