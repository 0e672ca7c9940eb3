"""Text metrics per row, their aggregates, paired bootstrap intervals and the quality gate.

Per-row values are kept so that any subset of rows can be re-aggregated: that is what the
paired bootstrap does (resample rows, score base and tuned on the same rows, take the
difference). Corpus-level BLEU and chrF are recomputed from summed sufficient statistics,
as sacrebleu's own paired bootstrap does; BLEU's tokenizer follows the references' script.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.jobspec import GATE_METRICS, GateSpec

#: metric name → True when lower is better, False when higher is, None when neither
METRICS: dict[str, bool | None] = {
    "loss": True,
    "perplexity": True,
    "rouge1": False,
    "rouge2": False,
    "rougeL": False,
    "bleu": False,
    "chrf": False,
    "exact_match": False,
    "mean_output_words": None,
    "empty_share": True,
    "degenerate_share": True,
}
BOOTSTRAP_SAMPLES = 1000

#: scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, kana; and Han
_UNSPACED_NOT_HAN = (
    "\u0e00-\u0eff\u1000-\u109f\ua9e0-\ua9ff\uaa60-\uaa7f\u1780-\u17ff\u19e0-\u19ff"
    "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
)
_HAN = "\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_UNSPACED = re.compile(f"[{_UNSPACED_NOT_HAN}{_HAN}]")
_HAN_CHAR = re.compile(f"[{_HAN}]")


@dataclass
class RowScores:
    """Per-row scores of one model's answers on the evaluated rows."""

    nll: np.ndarray  # summed token negative log-likelihood of the reference, per row
    tokens: np.ndarray  # reference tokens per row
    rouge: dict[str, np.ndarray]  # rouge1/rouge2/rougeL F1 per row
    bleu_stats: np.ndarray  # sacrebleu BLEU sufficient statistics, one row each
    bleu_tokenizer: str  # the sacrebleu tokenizer they were counted with
    chrf_stats: np.ndarray  # sacrebleu chrF sufficient statistics, one row each
    exact: np.ndarray
    words: np.ndarray
    empty: np.ndarray
    degenerate: np.ndarray

    def __len__(self) -> int:
        return len(self.exact)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (for exact match)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def _spaced(text: str) -> str:
    """The text with each character of a script written without spaces (Han, kana, Thai,
    Lao, Khmer, Myanmar) set apart by spaces, its combining marks kept with it."""
    out, apart = [], False
    for char in text:
        if unicodedata.category(char)[0] == "M":
            out.append(char)
            continue
        unspaced = _UNSPACED.match(char) is not None
        out.append(f" {char}" if unspaced or apart else char)
        apart = unspaced
    return "".join(out)


def words(text: str) -> list[str]:
    """Lowercased runs of letters, digits and combining marks, in any script; a character of
    a script written without spaces is a word of its own."""
    text = _spaced(text.lower())
    return "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text).split()


def word_count(text: str) -> int:
    """Words as written: runs between spaces ("don't", "COVID-19": one each), and each
    character of a script written without spaces one word."""
    return len(_spaced(text).split())


class RougeTokenizer:
    """rouge_score's tokenizer for any script: ``words``, with the Porter stemming of its
    default tokenizer on ASCII words (so English scores as rouge_score scores it)."""

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self._english = DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        """The text's words, ASCII ones stemmed."""
        return [
            token
            for word in words(text)
            for token in (self._english.tokenize(word) if word.isascii() else [word])
        ]


def is_degenerate(text: str) -> bool:
    """A repetitive output: a word 3+ times in a row, or under half its trigrams distinct
    (a character of a script written without spaces counts as a word)."""
    tokens = _spaced(text.lower()).split()
    if re.search(r"\b(\w+)(?:\s+\1\b){2,}", " ".join(tokens)):
        return True
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(trigrams) >= 4 and len(set(trigrams)) / len(trigrams) < 0.5


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's tokenizer for BLEU on these references. Its default, '13a', splits at
    spaces and punctuation, so an answer in a script written without spaces is one token.
    When at least half the references hold such a script: 'char' where those scripts are
    most of their letters and not all Han (Japanese, Thai, Lao, Khmer, Myanmar: sacrebleu's
    'ja-mecab' needs MeCab, which termtune does not install), else 'zh' where they hold Han
    (each Han character a token, other text as 13a: an English term inside stays a word),
    else '13a' (a stray kana in English text does not split it into characters)."""
    unspaced = [r for r in references if _UNSPACED.search(r)]
    if not unspaced or len(unspaced) * 2 < len(references):
        return "13a"
    text = "".join(unspaced)
    letters = sum(c.isalpha() for c in text)
    apart, han = len(_UNSPACED.findall(text)), len(_HAN_CHAR.findall(text))
    if apart > han and apart * 2 >= letters:
        return "char"
    return "zh" if han else "13a"


@functools.cache
def _bleu(tokenize: str):  # noqa: ANN202
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True, tokenize=tokenize)


@functools.cache
def _chrf():  # noqa: ANN202
    from sacrebleu.metrics import CHRF

    return CHRF()


def score_rows(
    predictions: list[str], references: list[str], *, nll: list[float], tokens: list[int]
) -> RowScores:
    """Every per-row score of one model's predictions."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer())
    pairs = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    refs, tokenize = [references], bleu_tokenizer(references)
    return RowScores(
        nll=np.asarray(nll, dtype=float),
        tokens=np.asarray(tokens, dtype=float),
        rouge={k: np.array([p[k].fmeasure for p in pairs]) for k in ("rouge1", "rouge2", "rougeL")},
        bleu_stats=np.asarray(
            _bleu(tokenize)._extract_corpus_statistics(predictions, refs), dtype=float
        ),
        bleu_tokenizer=tokenize,
        chrf_stats=np.asarray(_chrf()._extract_corpus_statistics(predictions, refs), dtype=float),
        exact=np.array(
            [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
        ),
        words=np.array([word_count(p) for p in predictions], dtype=float),
        empty=np.array([not p.strip() for p in predictions]),
        degenerate=np.array([is_degenerate(p) for p in predictions]),
    )


def sacrebleu_signatures(rows: RowScores) -> dict[str, str]:
    """BLEU's tokenizer and sacrebleu's signatures of BLEU and chrF (tokenizer, smoothing,
    version...) for rows from ``score_rows``: what a figure is reproduced with."""
    bleu = _bleu(rows.bleu_tokenizer)
    return {
        "bleu_tokenizer": rows.bleu_tokenizer,
        "bleu": str(bleu.get_signature()),
        "chrf": str(_chrf().get_signature()),
    }


def aggregate(rows: RowScores, idx: np.ndarray | None = None) -> dict[str, float]:
    """Every metric over the rows (or a resample of them, given as indices)."""
    idx = np.arange(len(rows)) if idx is None else idx
    loss = float(rows.nll[idx].sum() / max(rows.tokens[idx].sum(), 1.0))
    bleu = _bleu(rows.bleu_tokenizer)._compute_score_from_stats(
        list(rows.bleu_stats[idx].sum(axis=0))
    )
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        **{k: float(v[idx].mean()) for k, v in rows.rouge.items()},
        "bleu": bleu.score,
        "chrf": _chrf()._compute_score_from_stats(list(rows.chrf_stats[idx].sum(axis=0))).score,
        "exact_match": float(rows.exact[idx].mean()),
        "mean_output_words": float(rows.words[idx].mean()),
        "empty_share": float(rows.empty[idx].mean()),
        "degenerate_share": float(rows.degenerate[idx].mean()),
    }


def paired_bootstrap(
    base: RowScores, tuned: RowScores, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of tuned − base for every metric, rows resampled in pairs."""
    rng = np.random.default_rng(seed)
    n = len(base)
    diffs: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(samples):
        idx = rng.integers(0, n, size=n)
        b, t = aggregate(base, idx), aggregate(tuned, idx)
        for metric in METRICS:
            diffs[metric].append(t[metric] - b[metric])
    return {
        m: (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) for m, d in diffs.items()
    }


def gate(
    base: dict[str, float],
    tuned: dict[str, float],
    intervals: dict[str, tuple[float, float]],
    *,
    rule: GateSpec,
) -> list[dict[str, Any]]:
    """Every rule of the gate that is on: ``{rule, passed, detail, values}`` each."""
    rules = []
    if rule.min_gain is not None:
        rules.append(_gain_rule(base, tuned, intervals, rule.primary_metric, rule.min_gain))
    for share, limit in (
        ("empty", rule.max_empty_share),
        ("degenerate", rule.max_degenerate_share),
    ):
        if limit is not None:
            rules.append(_share_rule(share, base[f"{share}_share"], tuned[f"{share}_share"], limit))
    if rule.require_lower_loss:
        b, t = base["loss"], tuned["loss"]
        passed = t < b
        rules.append(
            {
                "rule": "lower_loss",
                "passed": passed,
                "detail": f"test loss: tuned {t:.4f} vs base {b:.4f}; "
                + ("below base" if passed else "must be below base"),
                "values": {"base": b, "tuned": t},
            }
        )
    return rules


def _gain_rule(
    base: dict[str, float],
    tuned: dict[str, float],
    intervals: dict[str, tuple[float, float]],
    metric: str,
    min_gain: float,
) -> dict[str, Any]:
    low, high = intervals[metric]
    b, t = base[metric], tuned[metric]
    passed = low > min_gain
    verdict = "is above" if passed else "must be above"
    return {
        "rule": f"{metric}_gain",
        "passed": passed,
        "detail": f"{GATE_METRICS[metric]}: tuned {t:.4f} vs base {b:.4f}, gain {t - b:+.4f}, "
        f"95% interval [{low:+.4f}, {high:+.4f}]; its lower bound {verdict} {min_gain:g}",
        "values": {"base": b, "tuned": t, "gain": t - b, "ci95": [low, high], "min": min_gain},
    }


def _share_rule(share: str, base: float, tuned: float, limit: float) -> dict[str, Any]:
    passed = tuned <= limit and tuned <= base
    demand = f"at most {limit:.1%} and not above base"
    return {
        "rule": f"{share}_share",
        "passed": passed,
        "detail": f"{share} answers: tuned {tuned:.1%} vs base {base:.1%}; "
        + (demand if passed else f"must be {demand}"),
        "values": {"base": base, "tuned": tuned, "max": limit},
    }
