"""The training report: markdown tables and a curves PNG, generated from a run's records.

Inputs are the metric rows the pipeline keeps (`history.jsonl` rows and eval rows), so the
report of a finished run can be rebuilt at any time from its folder alone.
"""
from __future__ import annotations

from pathlib import Path

from picorl.config import Config
from picorl.metrics import eval_difficulties, eval_metric, parse_eval_metric

CURVES = [("train/reward_mean", "reward (mean)"), ("train/frac_correct", "fraction correct (sampled)"),
          (None, "greedy eval accuracy"), ("train/frac_truncated", "fraction truncated (hit max_tokens)"),
          ("train/frac_formatted", "fraction formatted"), ("train/completion_len", "completion length (tokens)"),
          ("train/loss", "loss"), ("train/grad_norm", "grad norm")]


def _series(rows, kind, key):
    return [(r["step"], r["metrics"][key]) for r in rows if r["kind"] == kind and key in r["metrics"]]


def _pct(x):
    return f"{100 * x:.1f}%"


def _opt_pct(x):
    """A fraction as a percentage, or '-' for a run recorded before the metric existed."""
    return "-" if x is None else f"{100 * x:.0f}%"


def observations(evals: list[dict]) -> list[str]:
    """Peak, final and plateau per eval difficulty, computed from the eval rows."""
    out = []
    for d in eval_difficulties(evals):
        key = eval_metric("acc", d)
        pts = [(r["step"], r["metrics"][key]) for r in evals if key in r["metrics"]]
        if not pts:
            continue
        peak_step, peak = max(pts, key=lambda p: (p[1], -p[0]))
        final_step, final = pts[-1]
        line = f"d{d}: {_pct(pts[0][1])} after SFT, peak {_pct(peak)} at update {peak_step}, " \
               f"final {_pct(final)} at update {final_step}"
        tail = [v for _, v in pts[-3:]]
        if len(pts) >= 4 and max(tail) - min(tail) <= 0.05 and final < 1.0:
            line += f"; plateau over the last {len(tail)} evals ({_pct(min(tail))}-{_pct(max(tail))})"
        elif final < peak - 0.05:
            line += f"; {_pct(peak - final)} below its peak at the end"
        out.append(line)
    return out


def gain_line(d: str, g: dict) -> str:
    """One line of what GRPO changed at a difficulty, e.g. `d3 exact after SFT 31.2% -> after
    GRPO 44.5% on 256 held-out items (gained 41, lost 7; sign test p = 6e-07)`, then where the
    environment reads working `; reasoned 27.0% -> 42.6% (gained 52, lost 12; p = 2.4e-05)`, and with
    eval.samples `; sampled 39.9% -> 50.1% (rose on 94, fell on 46; p = 6.1e-05), pass@4 65.6% -> 74.6%`."""
    line = (f"d{d} exact after SFT {_pct(g['before'])} -> after GRPO {_pct(g['after'])} on {g['n']} held-out items "
            f"(gained {g['gained']}, lost {g['lost']}; sign test p = {g['p_value']:.2g})")
    if r := g.get("reasoned"):  # exact answers that are what their own chain derived
        line += (f"; reasoned {_pct(r['before'])} -> {_pct(r['after'])} (gained {r['gained']}, lost {r['lost']}; "
                 f"p = {r['p_value']:.2g})")
    if s := g.get("sampled"):  # eval.samples: the sampled policy, which GRPO trains, moves first
        k = g.get("samples", "k")
        line += (f"; sampled {_pct(s['before'])} -> {_pct(s['after'])} (rose on {s['rose']}, fell on {s['fell']}; "
                 f"p = {s['p_value']:.2g}), pass@{k} {_pct(s['pass_before'])} -> {_pct(s['pass_after'])}")
    return line


def render_report(cfg: Config, history: list[dict], evals: list[dict], *, title: str | None = None,
                  curves_name: str = "curves.png", extra: str = "", gains: dict | None = None) -> str:
    g, m = cfg.grpo, cfg.model
    lines = [f"# {title or cfg.run.name}: training report", "", "## Config", "",
             "| setting | value |", "|---|---|",
             f"| task | {cfg.env.name}" + (f" ({', '.join(f'{k}={v}' for k, v in cfg.env.options.items())})"
                                           if cfg.env.options else "") + " |",
             f"| model | {m.name} |",
             "| adapter | " + (f"LoRA r{m.lora.rank} / alpha {m.lora.alpha}" if m.lora.enabled else "full fine-tuning") + " |",
             f"| algorithm | {g.algorithm} ({g.tasks_per_update} tasks x k {g.group_size}"
             + (" + the greedy answer" if g.greedy_member else "") + f", lr {g.lr}) |",
             f"| reward | {cfg.reward.kind}" + (f" + format bonus {cfg.reward.format_bonus}" if cfg.reward.format_bonus else "")
             + (f", overlong penalty over the last {cfg.reward.overlong_buffer} tokens" if cfg.reward.overlong_buffer else "")
             + (", truncated completions filtered" if g.overlong_filter else "") + " |",
             f"| rollouts | {cfg.rollout.engine}, temperature {cfg.rollout.temperature}, max_tokens {cfg.rollout.max_tokens} |",
             "| SFT | " + (f"{cfg.sft.style}, {cfg.sft.steps} steps x {cfg.sft.batch_size}, lr {cfg.sft.lr}" if cfg.sft.enabled else "off") + " |",
             "| stages | " + ", ".join(
                 f"d{s.difficulty} x {s.updates}" + (f" (promote at {s.promote_at})" if s.promote_at is not None else "")
                 for s in cfg.stages) + " |",
             f"| evals | every {cfg.eval.every} updates, greedy, d{cfg.eval.difficulties} x {cfg.eval.size} |", ""]

    sft = _series(history, "sft", "sft/loss")
    first_eval = evals[0] if evals else None
    train = [r for r in history if r["kind"] == "train"]
    lines += ["## SFT warmup", "", "| loss first -> last | post-SFT format compliance | post-SFT mean reward |",
              "|---|---|---|"]
    fmt = [v for k, v in (first_eval or {}).get("metrics", {}).items() if (parse_eval_metric(k) or ("",))[0] == "format"]
    lines.append(f"| {sft[0][1]:.3f} -> {sft[-1][1]:.3f} | " if sft else "| (no SFT) | ")
    lines[-1] += (f"{_pct(sum(fmt) / len(fmt))} |" if fmt else "- |") + \
        (f" {train[0]['metrics']['train/reward_mean']:.3f} (update 1) |" if train else " - |")
    lines.append("")

    if train:
        lines += ["## Reward trajectory", "",
                  "| update | difficulty | reward mean | fraction correct | zero-var groups | completion len "
                  "| truncated | formatted |", "|---|---|---|---|---|---|---|---|"]
        stride = max(1, len(train) // 12)
        picked = train[::stride] + ([train[-1]] if (len(train) - 1) % stride else [])
        for r in picked:
            mm = r["metrics"]
            lines.append(f"| {r['step']} | d{int(mm.get('train/difficulty', 0))} | {mm['train/reward_mean']:.3f} | "
                         f"{mm['train/frac_correct']:.3f} | {mm['train/frac_zero_var_groups']:.2f} | "
                         f"{mm['train/completion_len']:.0f} | {_opt_pct(mm.get('train/frac_truncated'))} | "
                         f"{_opt_pct(mm.get('train/frac_formatted'))} |")
        lines.append("")

    if evals:
        ds = eval_difficulties(evals)
        keys = [eval_metric("acc", d) for d in ds]
        best = {k: max(r["metrics"].get(k, -1) for r in evals) for k in keys}
        lines += ["## Greedy evals (exact)", "", "| update | " + " | ".join(f"d{d}" for d in ds) + " |",
                  "|---|" + "---|" * len(keys)]
        for r in evals:
            cells = []
            for k in keys:
                v = r["metrics"].get(k)
                cell = "-" if v is None else _pct(v)
                cells.append(f"**{cell}**" if v is not None and v == best[k] else cell)
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
        lines += ["", "## Observations", ""] + [f"- {o}" for o in observations(evals)] + [""]
    if gains:
        lines += ["## What GRPO changed (same held-out items, first eval against the last)", ""]
        lines += [f"- {gain_line(d, g)}" for d, g in gains.items()] + [""]
    if extra:
        lines += [extra, ""]
    lines += [f"![curves]({curves_name})", ""]
    return "\n".join(lines)


def plot_curves(history: list[dict], evals: list[dict], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for ax, (key, title) in zip(axes.flat, CURVES):
        if key is None:
            ds = eval_difficulties(evals)
            for d in ds:
                pts = _series(evals, "eval", eval_metric("acc", d))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"d{d}")
            ax.set_ylim(-0.02, 1.02)
            if ds:
                ax.legend()
        else:
            pts = _series(history, "train", key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            # Mark curriculum moves: a reward drop right after one is the harder tier, not a regression.
            diffs = _series(history, "train", "train/difficulty")
            for (_, a), (step, b) in zip(diffs, diffs[1:]):
                if a != b:
                    ax.axvline(step, color="grey", linestyle="--", alpha=0.6)
                    ax.annotate(f"d{int(b)}", (step, 1), xycoords=("data", "axes fraction"),
                                xytext=(3, -12), textcoords="offset points", color="grey")
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(cfg: Config, history: list[dict], evals: list[dict], run_dir,
                 gains: dict | None = None) -> tuple[Path, Path]:
    """report.md and curves.png in a run folder."""
    from picorl.files import atomic_write_text
    from picorl.run_folder import RunFolder

    run = RunFolder(run_dir)
    curves = plot_curves(history, evals, run.curves)
    report = atomic_write_text(run.report, render_report(cfg, history, evals, curves_name=run.curves.name,
                                                                gains=gains))
    return report, curves
