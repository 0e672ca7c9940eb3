"""Text metrics per row, their aggregates, paired bootstrap intervals and the quality gate.

Per-row values are kept so that any subset of rows can be re-aggregated: that is what the
paired bootstrap does (resample prompts, each with all its rows, score base and tuned on the
same rows, take the difference). A prompt is the unit because data-prep keeps a term and all
its reference answers in one split: the rows of one prompt share the model's one answer and
are not independent draws. Corpus-level BLEU and chrF are recomputed from summed sufficient
statistics, as sacrebleu's own paired bootstrap does; BLEU's tokenizer follows the
references' script.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
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
    "echo_share": True,
}
BOOTSTRAP_SAMPLES = 1000
#: what the paired bootstrap resamples (each with all its rows)
BOOTSTRAP_UNIT = "prompt"
#: a phrase repeated over at least this share of an answer's words makes it degenerate
REPEATED_COVER = 0.8
#: an answer at least this close to its prompt (ROUGE-L F1 on words) echoes it
ECHO_ROUGE_L = 0.8

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
    degenerate: np.ndarray  # repetitive, or echoing the prompt
    echo: np.ndarray  # the prompt (or words of it only) given back as the answer

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
    """A repetitive output, compared as ``words`` (case, punctuation and script aside): a
    phrase (a word or more) three times in a row; a phrase twice in a row over most of the
    answer; one word three or more times and over half the words; or under half its
    trigrams distinct."""
    tokens = words(text)
    if not tokens:
        return False
    if _repeats_a_phrase(tokens):
        return True
    most = Counter(tokens).most_common(1)[0][1]
    if most >= 3 and most * 2 > len(tokens):
        return True
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(trigrams) >= 4 and len(set(trigrams)) / len(trigrams) < 0.5


def _repeats_a_phrase(tokens: list[str]) -> bool:
    """A phrase of ``period`` words repeated three times in a row anywhere, or twice in a
    row over REPEATED_COVER of the words."""
    ids = np.unique(tokens, return_inverse=True)[1]
    for period in range(1, len(ids) // 2 + 1):
        run = _longest_run(ids[:-period] == ids[period:])
        if run >= 2 * period or (run >= period and run + period >= REPEATED_COVER * len(ids)):
            return True
    return False


def _longest_run(flags: np.ndarray) -> int:
    """The length of the longest run of True."""
    if not flags.any():
        return 0
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())


def is_echo(answer: str, prompt: str) -> bool:
    """An answer that gives the question back, compared as ``words``: within ECHO_ROUGE_L
    of the prompt. The term alone is no echo: plain-language glossaries answer "cancer"
    for "cancer" and "heart disease" for "coronary heart disease"."""
    said, asked = words(answer), words(prompt)
    if not said or not asked:
        return False
    lcs = _lcs(said, asked)
    return 2 * lcs / (len(said) + len(asked)) >= ECHO_ROUGE_L


def _lcs(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two word lists."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


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
    predictions: list[str],
    references: list[str],
    *,
    nll: list[float],
    tokens: list[int],
    prompts: list[str] | None = None,
) -> RowScores:
    """Every per-row score of one model's predictions; ``prompts`` (the questions asked) to
    find answers that echo them (None: none counted)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer())
    pairs = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    refs, tokenize = [references], bleu_tokenizer(references)
    asked = prompts if prompts is not None else [""] * len(predictions)
    echo = np.array([is_echo(p, q) for p, q in zip(predictions, asked, strict=True)], dtype=bool)
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
        degenerate=np.array([is_degenerate(p) for p in predictions], dtype=bool) | echo,
        echo=echo,
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
        "echo_share": float(rows.echo[idx].mean()),
    }


def paired_bootstrap(
    base: RowScores,
    tuned: RowScores,
    *,
    clusters: Sequence[Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of tuned − base for every metric, base and tuned scored on
    the same resample: of ``clusters`` (each row's prompt: a drawn prompt brings all its
    rows), or of rows where None."""
    rng = np.random.default_rng(seed)
    members = cluster_rows(clusters if clusters is not None else range(len(base)))
    diffs: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(samples):
        drawn = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[i] for i in drawn])
        b, t = aggregate(base, idx), aggregate(tuned, idx)
        for metric in METRICS:
            diffs[metric].append(t[metric] - b[metric])
    return {
        m: (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) for m, d in diffs.items()
    }


def cluster_rows(keys: Sequence[Hashable]) -> list[np.ndarray]:
    """The row indices of each distinct key, in the order the keys first appear."""
    rows: dict[Hashable, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, []).append(row)
    return [np.asarray(r) for r in rows.values()]


def prompt_key(prompt: str) -> str:
    """The cluster a row belongs to: its prompt in any case (data-prep's grouping)."""
    return prompt.casefold()


def gate(
    base: dict[str, float],
    tuned: dict[str, float],
    intervals: dict[str, tuple[float, float]],
    *,
    rule: GateSpec,
    prompts: int,
) -> list[dict[str, Any]]:
    """Every rule of the gate that is on: ``{rule, passed, detail, values}`` each;
    ``prompts``: the distinct test prompts the intervals resampled."""
    rules = []
    if rule.min_gain is not None:
        rules.append(_gain_rule(base, tuned, intervals, rule=rule, prompts=prompts))
    for share, limit in (
        ("empty", rule.max_empty_share),
        ("degenerate", rule.max_degenerate_share),
    ):
        if limit is not None:
            rules.append(_share_rule(share, base, tuned, limit))
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
    *,
    rule: GateSpec,
    prompts: int,
) -> dict[str, Any]:
    metric, min_gain, fewest = rule.primary_metric, rule.min_gain, rule.min_test_prompts
    low, high = intervals[metric]
    b, t = base[metric], tuned[metric]
    enough = fewest is None or prompts >= fewest
    passed = enough and low > min_gain
    verdict = "is above" if passed else "must be above"
    detail = (
        f"{GATE_METRICS[metric]}: tuned {t:.4f} vs base {b:.4f}, gain {t - b:+.4f}, "
        f"95% interval [{low:+.4f}, {high:+.4f}]; its lower bound {verdict} {min_gain:g}"
    )
    if not enough:
        detail = (
            f"{GATE_METRICS[metric]}: {prompts} distinct test prompts, fewer than the "
            f"{fewest} an interval needs to mean anything (evaluation.gate.min_test_prompts); "
            f"tuned {t:.4f} vs base {b:.4f}, gain {t - b:+.4f}, 95% interval "
            f"[{low:+.4f}, {high:+.4f}]"
        )
    return {
        "rule": f"{metric}_gain",
        "passed": passed,
        "detail": detail,
        "values": {
            "base": b,
            "tuned": t,
            "gain": t - b,
            "ci95": [low, high],
            "min": min_gain,
            "prompts": prompts,
            "min_prompts": fewest,
        },
    }


def _share_rule(
    share: str, base: dict[str, float], tuned: dict[str, float], limit: float
) -> dict[str, Any]:
    b, t = base[f"{share}_share"], tuned[f"{share}_share"]
    passed = t <= limit and t <= b
    demand = f"at most {limit:.1%} and not above base"
    values: dict[str, Any] = {"base": b, "tuned": t, "max": limit}
    echoed = ""
    if share == "degenerate":  # echoes count as degenerate: say how many there were
        values["echo"] = {"base": base["echo_share"], "tuned": tuned["echo_share"]}
        if base["echo_share"] or tuned["echo_share"]:
            echoed = (
                f" (echoing the question: tuned {tuned['echo_share']:.1%} vs base "
                f"{base['echo_share']:.1%})"
            )
    return {
        "rule": f"{share}_share",
        "passed": passed,
        "detail": f"{share} answers: tuned {t:.1%} vs base {b:.1%}{echoed}; "
        + (demand if passed else f"must be {demand}"),
        "values": values,
    }
