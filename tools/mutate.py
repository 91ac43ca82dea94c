"""Mutation harness: plant known bugs, one at a time, in a copy of the project and check that the
tests catch every one.

    python tools/mutate.py                  # every mutant (CPU: ~4 min of CPU time)
    python tools/mutate.py -j 2             # two at a time (one copy of the tree each)
    python tools/mutate.py gemv-fused-bias nearest-tie    # some, by id
    python tools/mutate.py --list           # ids, areas and what each plants
    python tools/mutate.py --check-anchors  # only check every anchor still matches (instant)

Each mutant replaces one exact string (its anchor) in one file of a temporary copy of the tree.
The anchor must occur exactly once, or the harness stops: code that moved must move its mutant
too, so the harness cannot quietly test nothing. The copy is what the tests import: PYTHONPATH
points at it, ``sparselora/triton_kernels`` is linked to its ``triton_kernels/`` (setup.py maps
that package there), and the harness checks where the modules come from before it starts.

First the selected tests run once on the unmutated copy (they must pass), then once per mutant
with ``-x``: the mutant is *killed* when they fail, *survives* when they pass. Anything else
(a collection error, a timeout) is reported as an error. Exit status 0 only if every mutant is
killed.
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


GEMM, GEMV, LORA = "triton_kernels/sparse24_gemm.py", "triton_kernels/sparse24_gemv.py", "triton_kernels/sparse_lora.py"
HYBRID = "sparselora/backends/hybrid_backend.py"
T_GEMM, T_GEMV, T_LORA = "tests/test_triton_gemm.py", "tests/test_triton_gemv.py", "tests/test_sparse_lora.py"
T_CSLT = "tests/test_cusparselt_backend.py"

MUTANTS = [
    # -- the canonical format ------------------------------------------------------------------
    Mutant("pack-index-order", "format", "pack_24 writes the 16 indices of a meta word in reverse order",
           "sparselora/format.py",
           "shifts = 2 * torch.arange(_IDX_PER_WORD, device=idx.device, dtype=torch.int64)",
           "shifts = 2 * torch.arange(_IDX_PER_WORD, device=idx.device, dtype=torch.int64).flip(0)",
           ("tests/test_format.py",)),
    Mutant("unpack-swap-i0-i1", "format", "unpack_24 puts the first kept value at i1 and the second at i0",
           "sparselora/format.py",
           "dense.scatter_(-1, idx, packed.values.reshape(rows, cols // 4, 2))",
           "dense.scatter_(-1, idx.flip(-1), packed.values.reshape(rows, cols // 4, 2))",
           ("tests/test_format.py",)),
    Mutant("nm-mask-keeps-smallest", "pruning", "nm_mask keeps the lowest-scoring N of each group",
           "sparselora/format.py",
           "order = torch.sort(groups, dim=-1, descending=True, stable=True)",
           "order = torch.sort(groups, dim=-1, descending=False, stable=True)",
           ("tests/test_format.py",)),
    # -- Triton GEMM launcher and masks --------------------------------------------------------
    Mutant("gemm-k-mask", "triton gemm", "the forward kernel masks off the last group of 4 K-columns of x",
           GEMM, "mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)",
           "mask=m_mask[:, None] & (offs_k[None, :] < K - 4), other=0)",
           (f"{T_GEMM}::test_linear_bias_and_no_bias",)),
    Mutant("gemm-meta-word-mask", "triton gemm", "the partial last meta word (K % 32 != 0) is not loaded",
           GEMM, "mask=row_mask[:, None] & (wcol[None, :] < (K + 31) // 32), other=0)",
           "mask=row_mask[:, None] & (wcol[None, :] < K // 32), other=0)",
           (f"{T_GEMM}::test_linear_bias_and_no_bias",)),
    Mutant("gemm-split-bias", "triton gemm", "the split-K path finalizes without the bias",
           GEMM, "        _finalize(ws, bias, y)\n", "        _finalize(ws, None, y)\n",
           (f"{T_GEMM}::test_split_path_is_really_split",)),
    Mutant("gemm-t-n-mask", "triton gemm", "dx = dy @ W skips the last row of W",
           GEMM, "        n_mask = offs_n < N\n        w = _dense_tile(",
           "        n_mask = offs_n < N - 1\n        w = _dense_tile(",
           (f"{T_GEMM}::test_matmul_t_matches_float64",)),
    # -- Triton GEMV launcher and masks --------------------------------------------------------
    Mutant("gemv-fused-bias", "triton gemv", "the fused (no split) GEMV launch drops the bias",
           GEMV, "HAS_BIAS=bias is not None, SPLIT_OUT=False,", "HAS_BIAS=False, SPLIT_OUT=False,",
           (f"{T_GEMV}::test_gemv_bias_and_no_bias",)),
    Mutant("gemv-token-mask", "triton gemv", "the GEMV never writes the last row of x's output",
           GEMV, "out_mask = n_mask[:, None] & (tok[None, :] < M)", "out_mask = n_mask[:, None] & (tok[None, :] < M - 1)",
           (f"{T_GEMV}::test_gemv_bias_and_no_bias",)),
    Mutant("gemv-meta-word-mask", "triton gemv", "the GEMV does not load the last meta word of a row",
           GEMV, "mask=n_mask[:, None] & (wcol[None, :] < n_words), other=0)",
           "mask=n_mask[:, None] & (wcol[None, :] < n_words - 1), other=0)",
           (f"{T_GEMV}::test_gemv_bias_and_no_bias",)),
    # -- SparseLoRA kernels and merge ----------------------------------------------------------
    Mutant("lora-fused-mask", "sparselora kernel", "the fused forward adds the LoRA update outside the 2:4 mask",
           LORA, "weff = tl.where(keep, w + ba, 0.0)", "weff = w + ba",
           (f"{T_LORA}::test_fwd_kernel_vs_float64",)),
    Mutant("lora-dropout-mask", "sparselora kernel", "the dropout-input forward leaks the LoRA update outside the mask",
           LORA, "lora = tl.where(keep, ba, 0.0)", "lora = ba",
           (f"{T_LORA}::test_fwd_kernel_vs_float64",)),
    Mutant("lora-dab-scale", "sparselora kernel", "dA / dB are computed without the scaling s",
           LORA, "g = tl.where(keep, g * scaling, 0.0)", "g = tl.where(keep, g, 0.0)",
           (f"{T_LORA}::test_dab_kernel_vs_float64",)),
    Mutant("lora-merge-scale", "sparselora merge", "merge() folds B·A into W without the scaling",
           "sparselora/lora.py",
           "upd = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc)) * self.scaling",
           "upd = (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc))",
           (f"{T_LORA}::test_module_forward_merge_unmerge",)),
    # -- backends ------------------------------------------------------------------------------
    Mutant("reference-bias", "backend reference", "the reference backend drops the bias",
           "sparselora/backends/reference.py",
           "return sparse24_linear(x, packed.values, packed.meta, bias)",
           "return sparse24_linear(x, packed.values, packed.meta, None)",
           ("tests/test_backend_conformance.py",)),
    Mutant("triton-cuda-kernel-bias", "backend triton", "the op's CUDA kernel (the Triton launcher) drops the bias",
           "sparselora/backends/triton_backend.py",
           "return sparse24_linear_triton(x, values, meta, bias)",
           "return sparse24_linear_triton(x, values, meta, None)",
           (f"{T_GEMM}::test_cuda_kernels_of_the_ops_on_cpu",)),
    Mutant("triton-gemv-bias", "backend triton-gemv", "TritonGemvBackend.linear drops the bias on the GEMV path",
           "sparselora/backends/triton_gemv_backend.py",
           "return sparse24_gemv_triton(x, packed.values, packed.meta, bias)",
           "return sparse24_gemv_triton(x, packed.values, packed.meta, None)",
           (f"{T_GEMV}::test_gemv_backend_linear_runs_the_real_kernel_with_bias",)),
    Mutant("cusparselt-grad-route", "backend cusparselt", "the cuSPARSELt layer ignores that x needs a gradient",
           "sparselora/backends/cusparselt_backend.py",
           "x.requires_grad or packed.values.requires_grad or", "packed.values.requires_grad or",
           (f"{T_CSLT}::test_cusparselt_routes_autograd_to_the_op",)),
    Mutant("cusparselt-align", "backend cusparselt", "cuSPARSELt's 16-alignment rule checks multiples of 8",
           "sparselora/backends/cusparselt_backend.py",
           'if v % WEIGHT_ALIGN]', 'if v % 8]',
           (f"{T_CSLT}::test_unsupported_reasons",)),
    # -- dispatch policy -----------------------------------------------------------------------
    Mutant("auto-priority", "dispatch", "auto tries the lowest-priority backend first",
           "sparselora/backends/base.py",
           "return sorted(_REGISTRY.values(), key=lambda b: -b.priority)",
           "return sorted(_REGISTRY.values(), key=lambda b: b.priority)",
           (f"{T_CSLT}::test_auto_takes_the_highest_priority_backend_that_runs",)),
    Mutant("hybrid-threshold", "dispatch", "the hybrid switches to cuSPARSELt only above the threshold M",
           HYBRID, 'return "cusparselt" if m >= cusparselt_min_m(', 'return "cusparselt" if m > cusparselt_min_m(',
           (f"{T_CSLT}::test_policy_without_table_uses_the_heuristic",)),
    Mutant("nearest-tie", "dispatch", "nearest_measured breaks a log-scale tie toward the smaller measured M",
           "sparselora/backends/speed.py", "math.log2(max(m, 1))), -v))", "math.log2(max(m, 1))), v))",
           (f"{T_CSLT}::test_nearest_breaks_a_log_scale_tie_toward_the_larger_m",)),
    Mutant("derive-tie-win", "dispatch", "derive_thresholds counts a tie with Triton as a loss",
           HYBRID, 'wins = [r["cusparselt_us"] <= r[rival] for r in rows]', 'wins = [r["cusparselt_us"] < r[rival] for r in rows]',
           (f"{T_CSLT}::test_derive_thresholds_counts_a_tie_as_a_cusparselt_win",)),
    Mutant("derive-tie-dense", "dispatch", "derive_thresholds counts a tie with dense as slower",
           HYBRID, 'if r["hybrid_us"] > r["dense_us"]:', 'if r["hybrid_us"] >= r["dense_us"]:',
           (f"{T_CSLT}::test_derive_thresholds_does_not_count_a_tie_with_dense_as_slower",)),
    Mutant("mma-prior-prefill", "dispatch", "auto's mma-sp prior (no table) counts prefill M as a win",
           "sparselora/backends/mma_sp_policy.py", "lost = sorted({m for m in tokens if m > PRIOR_MAX_M})",
           "lost = sorted({m for m in tokens if m > 1 << 40})",
           ("tests/test_auto_policy.py::test_auto_on_a_gpu_leaves_prefill_dense_and_that_is_not_an_error",)),
    Mutant("speed-walk-none", "dispatch", "auto takes a backend nothing is known of after another said dense",
           "sparselora/backends/speed.py", "if verdict is None and dense_said:", "if False:",
           ("tests/test_patch.py::test_auto_leaves_dense_where_measurements_say_dense_is_faster",)),
    Mutant("emulator-no-fold", "emulator", "the mma.sp emulator drops the kernels' non-finite fold",
           "sparselora/mma_sp_emulator.py", 'acc = acc.masked_fill(flagged.unsqueeze(1), float("nan"))', "acc = acc",
           ("tests/test_mma_sp_emulator.py::test_nonfinite_x_gives_the_reference_backends_semantics",)),
    # -- pruning -------------------------------------------------------------------------------
    Mutant("wanda-no-norm", "pruning", "Wanda scores |W| without the activation norm",
           "sparselora/pruning/methods.py",
           "s = w.detach().abs().to(torch.float64) * sq_norm.to(torch.float64).sqrt().unsqueeze(0)",
           "s = w.detach().abs().to(torch.float64)",
           ("tests/test_pruning_methods.py::test_wanda_hand_checked", "tests/test_pruning_methods.py::test_wanda_matches_formula_random")),
    Mutant("sparsegpt-no-damp", "pruning", "SparseGPT inverts the Hessian without dampening",
           "sparselora/pruning/methods.py",
           "H += damp * torch.eye(cols, dtype=cdt, device=H.device)", "H += 0 * damp * torch.eye(cols, dtype=cdt, device=H.device)",
           ("tests/test_pruning_methods.py::test_sparsegpt_matches_plain_obs_reference",)),
    # -- checkpoints ---------------------------------------------------------------------------
    Mutant("checkpoint-checksum", "checkpoint", "load_sparse skips the checksum comparison",
           "sparselora/checkpoint.py", "    if got != want:\n", "    if False:\n",
           ("tests/test_checkpoint.py::test_truncated_and_corrupt_files",)),
    Mutant("checkpoint-shape", "checkpoint", "load_sparse accepts a packed layer of another shape than the model's",
           "sparselora/checkpoint.py", "        if (n, k) != shape:\n", "        if False:\n",
           ("tests/test_checkpoint.py::test_mismatched_model_and_dtype",)),
    # -- the patcher ---------------------------------------------------------------------------
    Mutant("from-linear-bias", "patcher", "SparseLinear.from_linear drops the layer's bias",
           "sparselora/modules.py",
           "bias = linear.bias.detach() if linear.bias is not None else None", "bias = None",
           ("tests/test_ops.py::test_sparse_linear_from_pruned_linear",)),
    # -- the mma.sp family (csrc/sparse_mma): layout tables, reorder, kernel source ------------
    Mutant("gpu-layout-a-col", "mma.sp layout", "the Python mirror of layout.h maps A registers a4..a7 to the wrong kept columns",
           "sparselora/gpu_layout.py", "def a_col(lane, i): return (lane & 3) * 2 + (i & 1) + (i >> 2) * 8",
           "def a_col(lane, i): return (lane & 3) * 2 + (i & 1) + ((i >> 2) & 1) * 4",
           ("tests/test_sparse_mma_layout.py::test_header_tables_equal_python_tables",)),
    Mutant("layout-h-selector", "mma.sp layout", "layout.h assigns odd k-tiles' metadata to lanes t in {1, 3}",
           "csrc/sparse_mma/layout.h", "SPARSE_MMA_HD constexpr int meta_selector(int lane) { return lane_in_group(lane) >> 1; }",
           "SPARSE_MMA_HD constexpr int meta_selector(int lane) { return lane_in_group(lane) & 1; }",
           ("tests/test_sparse_mma_layout.py::test_header_tables_equal_python_tables",)),
    Mutant("gpu-layout-pad-meta", "mma.sp layout", "the GPU layout pads metadata with 0b0000 (undefined for mma.sp)",
           "sparselora/gpu_layout.py", "PAD_META_WORD = 0x44444444", "PAD_META_WORD = 0",
           ("tests/test_gpu_layout.py::test_padding_meta_is_valid_and_checked",)),
    Mutant("mma-sp-wait-depth", "mma.sp kernel", "the cp.async pipeline computes a stage before its copies land",
           "csrc/sparse_mma/linear_kernel.cuh", "cp_async_wait<S - 2>();", "cp_async_wait<S - 1>();",
           ("tests/test_sparse_mma_host_sim.py::test_kernel_source_matches_float64",)),
    Mutant("mma-sp-row-tile-clamp", "mma.sp kernel", "row tiles past N copy from past the end of the values buffer",
           "csrc/sparse_mma/linear_kernel.cuh", "const long long row = mt0 + mt < p.Mt ? mt0 + mt : 0;",
           "const long long row = mt0 + mt;",
           ("tests/test_sparse_mma_host_sim.py::test_kernel_source_matches_float64",)),
    Mutant("mma-sp-split-dropped", "mma.sp kernel", "the last CTA of a split-K tile sums every split's partial but the last one",
           "csrc/sparse_mma/linear_kernel.cuh", "for (int s = 0; s < p.splits; ++s) {  // split order",
           "for (int s = 0; s < p.splits - 1; ++s) {  // split order",
           ("tests/test_sparse_mma_host_sim.py::test_split_k_matches_float64_in_any_cta_order",)),
    Mutant("patch-tied", "patcher", "sparsify packs a weight tied to another parameter (unties it)",
           "sparselora/patch.py", "        if others:\n", "        if False:\n",
           ("tests/test_patch.py::test_tied_weight_left_dense",)),
    Mutant("patch-dense-mask-kept", "patcher", "a layer left dense keeps its bool sparse_mask (1 byte per weight element)",
           "sparselora/patch.py", "    if not keep_dense_masks:\n", "    if False:\n",
           ("tests/test_patch.py::test_layer_left_dense_drops_its_mask_buffer",)),
    # -- restoration ---------------------------------------------------------------------------
    Mutant("distill-cache-wrong-batch", "restoration", "distill's teacher cache serves another batch's outputs",
           "sparselora/distill.py", "hit = cache.get(index) if cache is not None else None",
           "hit = cache.get(0) if cache is not None else None",
           ("tests/test_distill_cache.py::test_cached_training_equals_uncached",)),
    Mutant("sparsegpt-refit-no-conjugacy", "pruning", "the kept-weight refit forgets the previous direction (steepest descent)",
           "sparselora/pruning/methods.py", "        d = z + beta * d", "        d = z",
           ("tests/test_pruning_methods.py::test_sparsegpt_refit_reaches_the_per_row_optimum",)),
    Mutant("info-nce-one-way", "restoration", "the contrastive term scores only student->teacher, not both ways",
           "sparselora/distill.py", "return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))",
           "return F.cross_entropy(logits, target)",
           ("tests/test_distill_layers.py::test_info_nce_against_float64_and_order",)),
    Mutant("sparsegpt-given-mask-ignored", "pruning", "SparseGPT chooses its own N:M groups even when given a mask",
           "sparselora/pruning/methods.py", "            if p.is_nm and given is None and i % p.m == 0:",
           "            if p.is_nm and i % p.m == 0:",
           ("tests/test_pruning_methods.py::test_sparsegpt_compensates_for_a_given_mask",)),
    Mutant("calibration-counts-padding", "pruning", "Wanda/SparseGPT statistics count the padded positions of a batch",
           "sparselora/pruning/calibrate.py", "        self.stats[name].add(x, keep, self.sentence_rows if keep is not None else 0.0)",
           "        self.stats[name].add(x, None)",
           ("tests/test_pruning_padding.py::test_padded_batches_calibrate_like_unpadded_sentences",)),
    Mutant("siglip-padding-dropped", "pruning", "SigLIP's calibration drops the padded position its text tower pools",
           "sparselora/pruning/__init__.py", "        exclude_padding = False\n", "        pass\n",
           ("tests/test_pruning_padding.py::test_siglip_pools_a_padded_position_so_padding_counts",)),
    Mutant("text-mask-on-vision", "restore", "block and layer-wise losses apply the text's padding mask to a vision tower",
           "sparselora/families.py", '    return fam.classify(name) == "vision"', "    return False",
           ("tests/test_block_reconstruct.py::test_scored_batches_keep_text_masks_off_vision_towers_and_siglip",
            "tests/test_distill_layers.py::test_layerwise_padding_mask_reaches_text_blocks_only")),
    Mutant("distill-output-counts-padding", "restore", "the final output's distillation loss counts padded positions",
           "sparselora/distill.py", "keep = None if count_padding else real_tokens(batch)", "keep = None",
           ("tests/test_distill_layers.py::test_distill_passes_the_real_tokens_to_the_output_loss",)),
    Mutant("learned-mask-gradient-reversed", "pruning", "the learned-mask candidates mix with reversed weights (1 - p)",
           "sparselora/pruning/learned_masks.py", "        return (p.to(self.source.dtype) @ self.cand).reshape(rows, -1)",
           "        return ((1 - p).to(self.source.dtype) @ self.cand / (p.shape[-1] - 1)).reshape(rows, -1)",
           ("tests/test_learned_masks.py::test_learning_moves_a_wrong_prior_to_the_right_mask",)),
    Mutant("masked-restore-gradient-unmasked", "restore", "masked restoration lets the pruned entries train (re-masked only at the end)",
           "sparselora/masked_training.py", "    hooks = [lin.weight.register_hook(lambda g, m=lin.sparse_mask: g * m.to(g.dtype)) for lin in layers.values()]",
           "    hooks = []",
           ("tests/test_restore_masked.py::test_masked_restore_trains_inside_the_mask_only",)),
    Mutant("blocks-target-on-student-inputs", "restore", "block reconstruction runs the teacher's block on the student's inputs",
           "sparselora/block_reconstruct.py", "ht[b] = run_block(tl.module[i], cap_t, b, i, h)",
           "ht[b] = run_block(tl.module[i], cap_t, b, i, hs[b])",
           ("tests/test_block_reconstruct.py::test_replayed_blocks_match_the_full_models",)),
    Mutant("blocks-low-precision-kept-float32", "restore", "a bfloat16 block stays in its float32 working copy",
           "sparselora/block_reconstruct.py", "            t.data = t.data.to(dtypes[id(t)])", "            pass",
           ("tests/test_block_reconstruct.py::test_low_precision_student_trains_a_float32_copy_per_block",)),
    Mutant("blocks-learned-mask-not-recorded", "restore", "mask learning zeroes the weights off the learned mask but keeps the old sparse_mask",
           "sparselora/block_reconstruct.py", "lin.sparse_mask.copy_(new.to(lin.sparse_mask.dtype))", "pass",
           ("tests/test_block_reconstruct.py::test_mask_learning_moves_masks_and_stays_exactly_24",)),
    Mutant("bucketed-batches-short-to-long", "restore", "length-bucketed batches come short to long, not shuffled",
           "sparselora/calib_data.py", "random.Random(seed).shuffle(out)", "pass",
           ("tests/test_calib_data.py::test_text_batches_by_length_keeps_every_sentence_and_drops_the_padding",)),
    Mutant("cli-blocks-text-recipe-ignored", "restore", "the CLI's built-in text ignores the block-wise recipe (2048 sentences in batches of 16)",
           "sparselora/cli.py", "sentences, batch = text or (n * batch, batch)", "sentences = n * batch",
           ("tests/test_cli.py::test_text_calibration_batches_are_bucketed_and_sized",)),
    Mutant("eval-ood-compares-across-bases", "restore", "the out-of-domain report pairs rows that started from different 2:4 bases",
           "benchmarks/eval_ood.py", 'and (r["variant"] == "dense" or r.get("base_id") == ref[r["seed"]][1])]', "]",
           ("tests/test_eval_ood_report.py::test_only_rows_of_one_evaluation_set_and_base_are_compared",)),
    Mutant("restore-blocks-drops-mask-steps", "restore", "restore(method='blocks') accepts mask_steps but does not pass it on",
           "sparselora/restore.py", "lr=lr, progress=progress, **overrides)", "lr=lr, progress=progress)",
           ("tests/test_block_reconstruct.py::test_restore_blocks_passes_its_own_options_and_refuses_the_others",)),
    Mutant("rare-tokens-weight-common-tokens", "restore", "token weighting favours frequent tokens instead of rare ones",
           "sparselora/block_reconstruct.py", ".clamp_min(1).pow(-power) * k", ".clamp_min(1).pow(power) * k",
           ("tests/test_block_reconstruct.py::test_token_weights_follow_frequency_skip_padding_and_average_one",)),
    Mutant("rare-tokens-off-for-text", "restore", "restore(method='blocks') never weights rare tokens, text-only batches included",
           "sparselora/restore.py", "TEXT_RARE_TOKENS if text_only else 0.0", "0.0",
           ("tests/test_block_reconstruct.py::test_restore_weights_rare_tokens_on_text_only_batches",)),
    Mutant("manuals-keep-eval-text", "restore", "the system-manuals domain keeps sentences an evaluation domain holds",
           "sparselora/text_sources.py", "    elif domain in _YIELD_TO_EVAL:", "    elif False:",
           ("tests/test_eval_text.py::test_manuals_yield_every_evaluation_sentence",)),
    Mutant("library-domains-keep-readme-text", "restore", "the library-docstring calibration domains keep sentences a package README holds",
           "sparselora/text_sources.py", "    if domain in _YIELD_TO_READMES:", "    if False:",
           ("tests/test_eval_text.py::test_library_domains_yield_readme_sentences",)),
    Mutant("text-model-calib-built-in", "restore", "a text model's --calib text is read, then the built-in text is used instead",
           "sparselora/cli.py", "tok = AutoTokenizer.from_pretrained(_text_model_dir(processor_dirs))\n        return text_batches(tok, [s.text for s in data.samples]",
           "tok = AutoTokenizer.from_pretrained(_text_model_dir(processor_dirs))\n        from .text_sources import calibration_texts\n        return text_batches(tok, calibration_texts(len(data.samples))",
           ("tests/test_cli.py::test_text_model_calibrates_on_its_own_text",)),
]


def _ignore(dirpath, names):
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
    return [n for n in names if n in skip or n.endswith(".egg-info")]


def make_copy(dest: Path) -> Path:
    tree = dest
    shutil.copytree(ROOT, tree, ignore=_ignore, symlinks=True)
    link = tree / "sparselora" / "triton_kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "triton_kernels", target_is_directory=True)
    return tree


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file of the same size and second must not reuse the mutant's .pyc
    env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    return env


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def check_imports(tree: Path, env: dict) -> None:
    """Fail unless the copy's modules (not an installed sparselora) are the ones imported."""
    code = ("import sparselora, sparselora.backends.hybrid_backend as h, sparselora.triton_kernels.sparse24_gemm as g;"
            "print(sparselora.__file__); print(h.__file__); print(g.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"mutate: the copy does not import:\n{out.stderr}")
    for f in out.stdout.split():
        if not Path(f).absolute().is_relative_to(tree):
            raise SystemExit(f"mutate: {f} is imported instead of the copy under {tree} (an installed sparselora shadows it)")


def check_anchors(tree: Path, mutants) -> list[str]:
    problems = []
    for m in mutants:
        path = tree / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        n = path.read_text().count(m.old)
        if n != 1:
            problems.append(f"{m.id}: anchor occurs {n} times in {m.file} (must be exactly once): {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.id}: replacement equals the anchor")
        for t in m.tests:
            if not (tree / t.split("::")[0]).is_file():
                problems.append(f"{m.id}: test file {t.split('::')[0]} does not exist")
    return problems


def run_tests(tree: Path, env: dict, tests, timeout: float, stop_first: bool) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-rN"]
    cmd += ["-x"] if stop_first else []
    cmd += list(tests)
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.time() - t0
    tail = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode, tail[-1] if tail else "", time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check-anchors", action="store_true", help="only check that every anchor matches exactly once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at a time, each in its own copy (default 1)")
    args = ap.parse_args(argv)

    by_id = {m.id: m for m in MUTANTS}
    unknown = [i for i in args.ids if i not in by_id]
    if unknown:
        ap.error(f"unknown mutant ids {unknown}; see --list")
    mutants = [by_id[i] for i in args.ids] if args.ids else MUTANTS
    if args.list:
        for m in mutants:
            print(f"{m.id:26s} {m.area:20s} {m.what}")
        return 0
    problems = check_anchors(ROOT, mutants)
    if problems:
        print("mutate: stale mutants (fix the anchor in tools/mutate.py):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check_anchors:
        print(f"mutate: all {len(mutants)} anchors match exactly once")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="sparselora-mutate-"))
    try:
        trees = [make_copy(tmp / f"tree{i}") for i in range(max(1, args.jobs))]
        for tree in trees:
            check_imports(tree, env_for(tree))
        tests = sorted({t for m in mutants for t in m.tests})
        rc, last, secs = run_tests(trees[0], env_for(trees[0]), tests, args.timeout, stop_first=False)
        print(f"baseline (unmutated copy, {len(tests)} test selections): {last} [{secs:.0f} s]", flush=True)
        if rc != 0:
            print("mutate: the selected tests fail without any mutant; fix that first", file=sys.stderr)
            return 2
        free = queue.Queue()
        for tree in trees:
            free.put(tree)

        def run_one(m: Mutant) -> str:
            tree = free.get()  # a copy no other mutant is patching now
            path = tree / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, last, secs = run_tests(tree, env_for(tree), m.tests, args.timeout, stop_first=True)
            finally:
                path.write_text(original)
                free.put(tree)
            verdict = {0: "SURVIVED", 1: "killed"}.get(rc, f"ERROR (pytest exit {rc}: {last})")
            print(f"{m.id:26s} {m.area:20s} {verdict:10s} [{secs:4.0f} s]  {m.what}", flush=True)
            return verdict

        with ThreadPoolExecutor(len(trees)) as pool:
            results = list(zip(mutants, pool.map(run_one, mutants)))
        killed = sum(v == "killed" for _, v in results)
        survived = [m.id for m, v in results if v == "SURVIVED"]
        errors = [m.id for m, v in results if v not in ("killed", "SURVIVED")]
        print(f"\n{killed} of {len(results)} mutants killed; survived: {survived or 'none'}; errors: {errors or 'none'}")
        return 0 if killed == len(results) else 1
    finally:
        if args.keep:
            print(f"copy kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
