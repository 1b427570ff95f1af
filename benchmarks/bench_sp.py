"""ulysses_sp vs DeepSpeed ALST and plain transformers: the same model, batch, engine and kernel, in one launch.

    torchrun --nproc_per_node 4 benchmarks/bench_sp.py --out results.json
    torchrun --nproc_per_node 2 benchmarks/bench_sp.py --device cpu --model tiny-llama --seq-lens 64,128 --steps 2

For every sequence length and every configuration (``--configs``: ``ours`` / ``alst`` plus levers,
e.g. ``ours+cudnn+sac``, see spbench/levers.py) a fresh model and DeepSpeed engine are built,
warmed up and timed; then freed before the next. Printed on rank 0 and written to ``--out``:
step time (median of ``--steps`` timed steps, slowest rank), tokens/s per GPU, model TFLOP/s and
MFU (formula in ulysses_sp/train/flops.py), peak memory (max over ranks of max_memory_allocated over the
steps minus what was allocated before the configuration's build; the absolute value too), exposed
all-to-all / communication time (spbench/comm.py), the first
step's loss on both sides (parity), dynamo's graph-break count (JSON: ``graph_breaks``; 0 where each
compiled layer is one graph), ratios against ``--baseline``. ``--max-len-search`` then
searches the longest sequence that fits for each of ``--search-configs``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--model", default="llama-8b", help="ulysses_sp preset or a config.json path (random init)")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers override (0: the model's own)")
    p.add_argument("--sp", type=int, default=None, help="SP size (default: world size; dp = world / sp)")
    p.add_argument(
        "--ring-size",
        type=int,
        default=1,
        help="ours only: hybrid SP, ring attention across R groups of sp/R Ulysses ranks (docs/scaling.md)",
    )
    p.add_argument("--seq-lens", type=_csv_ints, default=[32768, 65536, 131072], help="comma-separated")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per SP group")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument(
        "--attn",
        default=None,
        choices=["flash_attention_2", "sdpa"],
        help="core attention kernel on both sides (default: flash_attention_2 when installed on CUDA, else sdpa)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2, 3],
        default=3,
        help="the same ZeRO stage on both sides (3: ArcticTraining's ALST recipes)",
    )
    p.add_argument(
        "--engine",
        choices=["deepspeed", "fsdp2"],
        default="deepspeed",
        help="ours and hf: DeepSpeed at --zero-stage, or FSDP2 (torch's fully_shard, fp32 master shards; "
        "ours as launch/train.py --fsdp); alst runs on DeepSpeed only",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configs",
        type=_csv,
        default=["alst", "ours"],
        help="side[+lever...] list; ours levers: cudnn, sac, noac, compile, liger, tiled, tiled_mlp, offload, norms, "
        "heads2, heads4; alst levers: cudnn, tiled_mlp, ac_offload; hf (plain transformers, sp=1 only) levers: "
        "cudnn, sac, noac, liger",
    )
    p.add_argument("--baseline", default=None, help="configuration the ratios divide by (default: first alst one)")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the extra profiled step that measures exposed communication",
    )
    p.add_argument(
        "--memory-sites",
        action="store_true",
        help="ours and hf, eager: one more forward + backward per configuration that names the allocations "
        "live at its peak (spbench/sites.py; on CPU the storages ops made); two lengths give each site's growth "
        "per token",
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=989e12,
        help="dense bf16 peak FLOP/s of one GPU, the MFU denominator (989e12: H100/H200 SXM)",
    )
    p.add_argument("--out", default="results.json", help="JSON file (rewritten after every configuration)")
    p.add_argument("--max-len-search", action="store_true", help="after the timing, search the longest sequence")
    p.add_argument(
        "--search-configs",
        type=_csv,
        default=["ours+tiled_mlp+offload+norms", "alst+tiled_mlp+ac_offload"],
        help="configurations searched (default: each side with all its memory features; ours tiles the "
        "loss in any case)",
    )
    p.add_argument("--search-start", type=int, default=131072)
    p.add_argument("--search-max", type=int, default=1 << 23)
    p.add_argument("--search-granularity", type=int, default=16384)
    p.add_argument("--search-budget-s", type=float, default=480.0, help="wall-time budget per searched configuration")
    p.add_argument("--search-steps", type=int, default=1, help="training steps per search attempt")
    p.add_argument(
        "--alloc-conf",
        default="expandable_segments:True",
        help="PYTORCH_CUDA_ALLOC_CONF when the environment does not set it ('' leaves it unset)",
    )
    p.add_argument("--timeout-s", type=float, default=1800.0, help="collective timeout (NCCL watchdog)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf  # before the first CUDA allocation
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

    import logging
    import warnings

    import torch
    import torch.distributed as dist

    from spbench import levers as lv
    from spbench.alst import AlstSide
    from spbench.hf import HfSide
    from spbench.ours import OursSide
    from spbench.report import Results
    from spbench.runner import Measure, Search, run_config, search_max_len
    from spbench.workload import DTYPES, Workload
    from ulysses_sp.core.topology import init_sp
    from ulysses_sp.integrations import deepspeed as ds_integration
    from ulysses_sp.train.build import init_distributed
    from ulysses_sp.train.plan import default_attention

    # deprecation notices raised on every step by DeepSpeed's / ArcticTraining's calls, not by this script
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device_type, args.timeout_s)
    ds_integration.init_comm()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = args.sp or world
    topology = init_sp(sp, args.ring_size)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    attn = args.attn or default_attention(device_type)
    configs = [(spec, *lv.parse(spec)) for spec in args.configs]
    searches = [(spec, *lv.parse(spec)) for spec in (args.search_configs if args.max_len_search else [])]
    problems = _problems(args, configs + searches, device_type, attn, sp)
    if problems:
        raise SystemExit("cannot run: " + "; ".join(problems))
    baseline = args.baseline or next(
        (spec for spec, side, _ in configs if side == "alst"), args.configs[0] if args.configs else None
    )
    workload = Workload(
        model=args.model,
        layers=args.layers or None,
        attn=attn,
        dtype=DTYPES[args.dtype],
        device=device,
        sp=sp,
        batch_size=args.batch_size,
        zero_stage=args.zero_stage,
        lr=args.lr,
        seed=args.seed,
        engine=args.engine,
    )
    sides = {"ours": OursSide(workload, topology), "alst": AlstSide(workload), "hf": HfSide(workload)}
    settings = {
        **{k: v for k, v in vars(args).items() if k != "local_rank"},
        "attn": attn,
        "sp": sp,
        "dp": world // sp,
        "world_size": world,
        "baseline": baseline,
        "device_type": device_type,
        "layers": workload.config("sdpa").num_hidden_layers,
    }
    results = Results(args.out, settings, device, rank)
    peak = args.peak_flops
    measure = Measure(
        warmup=args.warmup, steps=args.steps, profile=args.profile and device_type == "cuda", sites=args.memory_sites
    )
    results.log(
        f"{len(args.seq_lens)} lengths x {len(configs)} configurations on {world} ranks (sp {sp}), "
        f"attn {attn}; results -> {args.out}"
    )
    for seq_len in args.seq_lens:
        for spec, side, levers in configs:
            record = run_config(sides[side], spec, levers, seq_len, workload, measure, peak)
            results.add_run(record)
            results.log(_one_line(record))
    for spec, side, levers in searches:
        results.log(f"max-length search: {spec}")
        search = Search(
            start=args.search_start,
            max_len=args.search_max,
            granularity=args.search_granularity,
            budget_s=args.search_budget_s,
            steps=args.search_steps,
        )
        results.add_search(search_max_len(sides[side], spec, levers, workload, search, peak, log=results.log))
    results.log("\n" + results.table())
    dist.barrier()
    dist.destroy_process_group()


def _problems(args, configs, device_type: str, attn: str, sp: int) -> list[str]:
    """Everything that would fail or measure nothing, found before any GPU time is spent."""
    from spbench import levers as lv

    problems = [
        f"{spec}: {why}" for spec, _, levers in configs if (why := lv.available_or_reason(levers, device_type, attn))
    ]
    problems += [
        f"--seq-lens {s} is not a multiple of sp={sp} (ALST's adapter needs it)" for s in args.seq_lens if s % sp
    ]
    if sp > 1 and any(side == "hf" for _, side, _ in configs):
        problems.append(f"the hf side (plain transformers) has no sequence parallelism: run it with --sp 1, not {sp}")
    if args.engine == "fsdp2" and any(side == "alst" for _, side, _ in configs):
        problems.append("the alst side runs on DeepSpeed only: leave out --engine fsdp2 or the alst configurations")
    if args.ring_size > 1:
        from ulysses_sp.core.ring import RING_BACKENDS

        if attn not in RING_BACKENDS:
            problems.append(f"--ring-size {args.ring_size} runs with --attn in {list(RING_BACKENDS)}, not {attn}")
        problems += [
            f"--seq-lens {s} is not a multiple of 2 * sp = {2 * sp} (the ring's load-balanced layout)"
            for s in args.seq_lens
            if s % (2 * sp)
        ]
    if args.memory_sites:
        problems += [
            f"{spec}: --memory-sites names ops by the dispatcher, which compiled layers bypass; drop 'compile'"
            for spec, _, levers in configs
            if "compile" in levers
        ]
    if not args.seq_lens and not args.max_len_search:
        problems.append("nothing to do: give --seq-lens and/or --max-len-search")
    return problems


def _one_line(r: dict) -> str:
    leftover = r.get("mem_after_free_gib", 0.0)
    note = f"  [{leftover:.2f} GiB still allocated after freeing]" if leftover > 0.5 else ""
    return _summary(r) + note


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['seq_len']:>8} {r['config']:<28} {r['status']}: {r.get('errors')}"
    a2a = r.get("comm", {}).get("a2a_exposed_ms", {}).get("max")
    return (
        f"{r['seq_len']:>8} {r['config']:<28} {r['step_s']:.3f} s/step  {r['tok_s_per_gpu']:.0f} tok/s/GPU  "
        f"MFU {r['mfu'] * 100:.1f}%  peak {r['peak_mem_gib']:.2f} GiB"
        + (f"  a2a exposed {a2a:.1f} ms" if a2a is not None else "")
        + f"  ({r['wall_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
