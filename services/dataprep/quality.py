"""What prepared data says about itself: token lengths before and after truncation, the
lengths ``auto`` chose and why, unknown tokens, and the warnings a user should read.

Rows are tokenized in full and cut when they are routed to their split, so a truncation
share counts the rows that really lost tokens, and ``auto`` can pick the p99 of the data.
"""

from __future__ import annotations

import statistics
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.jobspec import DatasetSpec

SIDES = ("source", "target")
TRUNCATION_WARNING = 0.05  # share of rows cut
UNKNOWN_WARNING = 0.005  # share of tokens that are the tokenizer's unknown token


def percentile(ordered: list[int], q: float) -> int:
    """The q-quantile of sorted lengths (nearest rank: at most 1-q of them lie above it)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SideTokens:
    """One side's tokens over some rows: lengths before and after truncation, unknowns."""

    full: array = field(default_factory=lambda: array("I"))
    kept: array = field(default_factory=lambda: array("I"))
    unknown: int = 0

    def add(self, full: Iterable[int], kept: list[list[int]], *, unk_id: int | None) -> None:
        """Count a batch: its full lengths and its kept token ids."""
        self.full.extend(full)
        self.kept.extend(len(ids) for ids in kept)
        if unk_id is not None:
            self.unknown += sum(ids.count(unk_id) for ids in kept)

    def stats(self, limit: int) -> dict[str, float]:
        """Percentiles of kept lengths, the share of rows cut, and unknown tokens."""
        if not self.kept:
            return {}
        ordered = sorted(self.kept)
        total = sum(ordered)
        return {
            "min": ordered[0],
            "p50": percentile(ordered, 0.5),
            "p90": percentile(ordered, 0.9),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 2),
            "truncated_share": round(cut_share(self.full, limit), 4),
            "total": total,
            "unknown": self.unknown,
            "unknown_share": round(self.unknown / total, 4) if total else 0.0,
        }


def cut_share(full: Iterable[int], limit: int) -> float:
    """Share of rows longer than the limit."""
    lengths = list(full)
    return sum(n > limit for n in lengths) / len(lengths) if lengths else 0.0


def resolve_length(spec: DatasetSpec, side: str, full: array) -> dict[str, Any]:
    """The tokens kept on one side: the spec's number, or auto's p99 under its cap; and why."""
    setting = getattr(spec, f"max_{side}_length")
    cap = getattr(spec, f"max_{side}_length_cap")
    ordered = sorted(full)
    p99 = percentile(ordered, 0.99)
    seen = f"the p99 of {len(ordered)} rows' {side} lengths is {p99} tokens (longest {ordered[-1]})"
    if setting == "auto":
        chosen = min(p99, cap)
        where = "within" if p99 <= cap else "above"
        reason = f"auto: {seen}, {where} the cap {cap} (dataset.max_{side}_length_cap)"
        reason += ": capped" if p99 > cap else ""
    else:
        chosen, reason = setting, f"set by dataset.max_{side}_length; {seen}"
    return {
        "max_length": chosen,
        "setting": "auto" if setting == "auto" else "spec",
        "cap": cap if setting == "auto" else None,
        "p50": percentile(ordered, 0.5),
        "p90": percentile(ordered, 0.9),
        "p99": p99,
        "max": ordered[-1],
        "reason": reason,
    }


def summarise(
    lengths: dict[str, dict[str, Any]],
    splits: dict[str, dict[str, SideTokens]],
    *,
    unk_id: int | None,
    unk_token: str | None,
) -> tuple[dict[str, Any], list[str]]:
    """Fill each side's truncation and unknown shares over every split; the overall unknown
    tokens and the warnings."""
    warnings = []
    for side in SIDES:
        tokens = [splits[s][side] for s in splits]
        full = [n for t in tokens for n in t.full]
        share = cut_share(full, lengths[side]["max_length"])
        kept = sum(sum(t.kept) for t in tokens)
        unknown = sum(t.unknown for t in tokens)
        lengths[side]["truncated_share"] = round(share, 4)
        lengths[side]["unknown_share"] = round(unknown / kept, 4) if kept else 0.0
        if share > TRUNCATION_WARNING:
            setting = f"max_{side}_length" + ("_cap" if lengths[side]["setting"] == "auto" else "")
            warnings.append(
                f"{side}: {share:.1%} of rows are cut at {lengths[side]['max_length']} tokens "
                f"(p99 {lengths[side]['p99']}); raise dataset.{setting}"
            )
    kept = sum(sum(t.kept) for sides in splits.values() for t in sides.values())
    unknown = sum(t.unknown for sides in splits.values() for t in sides.values())
    share = unknown / kept if kept else 0.0
    if share > UNKNOWN_WARNING:
        warnings.append(
            f"unknown tokens: {share:.2%} of all tokens map to the tokenizer's unknown token "
            f"{unk_token} (characters it cannot spell); check the text or the base model"
        )
    overall = {"unk_id": unk_id, "tokens": kept, "unknown": unknown, "share": round(share, 4)}
    return overall, warnings
