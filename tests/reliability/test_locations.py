"""Fuzzed dataset locations: S3 URIs and local paths, none accepted outside what is allowed,
in production and in development (issue 19: the "3,000 fuzzed locations" were 629 distinct
strings, in production mode only)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from urllib.parse import quote

import pytest

from shared.errors import StoreLocationError
from shared.locations import check_source
from shared.settings import Settings

STORE = "s3://store-bucket/termtune"
BUCKET = "allowed-bucket"

#: ways to leave a folder or a bucket, each spelled several ways
ESCAPES = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "..%2f..",
    "..\\..",
    "...",
    "./..",
    "..;",
    "%252e%252e",
    "..%00",
    "..%c0%af",
]
SEPARATORS = ["/", "//", "/./", "%2f", "\\"]
ODD = ["\x00", "\n", "\t", "\x7f", "\u202e", "\uff0e\uff0e", "%00", "%0a", "\u2215"]
OTHER_BUCKETS = [
    "other",
    "Allowed-Bucket",
    "allowed-bucket.evil.example",
    "allowed-bucket@evil",
    "evil@allowed-bucket",
    "allowed-bucket:443",
    "allowed-bucket%2f..",
    "store-bucket",
    "allowed-bucket-2",
    "",
]


def _inside_names(rng: random.Random) -> str:
    """A plain dataset name, one of thousands (so a full run's locations are distinct)."""
    folder = rng.choice(["", "a/b/", "2026/q1/", "team-x/", "v1.2/data/"])
    stem = rng.choice(["terms", "x-y_z.v1", "glossary", "med_terms"]) + str(rng.randint(0, 99))
    return folder + stem + rng.choice([".jsonl", ".csv", ".parquet"])


def _s3_cases(rng: random.Random) -> list[tuple[str, bool]]:
    """(uri, really inside an allowed location)."""
    name = _inside_names(rng)
    sep, esc, odd = rng.choice(SEPARATORS), rng.choice(ESCAPES), rng.choice(ODD)
    return [
        (f"s3://{BUCKET}/{name}", True),
        (f"{STORE}/datasets/{name}", True),
        (f"s3://{rng.choice(OTHER_BUCKETS)}/{name}", False),
        (f"s3://{BUCKET}/{esc}{sep}{name}", False),
        (f"s3://{BUCKET}/data/{esc}/{esc}/{name}", False),
        (f"{STORE}/{esc}/other/{name}", False),
        (f"{STORE}{sep}{esc}{sep}{name}", False),
        (f"s3://store-bucket/other-prefix/{name}", False),
        (f"s3://store-bucket/termtune-evil/{name}", False),
        (f"s3://{BUCKET}/a{odd}b/{name}", False),
        (f"s3://{BUCKET}/{name}?versionId=1", False),
        (f"s3://{BUCKET}/{name}#frag", False),
        (f"S3://{BUCKET}/{name}", False),
        (f"s3:/{BUCKET}/{name}", False),
        (f"s3:///{BUCKET}/{name}", False),
        (f"https://{BUCKET}.s3.amazonaws.com/{name}", False),
        (f"gs://{BUCKET}/{name}", False),
        (f"s3://{BUCKET}", False),
        (f"s3://{BUCKET}/", False),
    ]


def _local_cases(rng: random.Random, allowed: Path, outside: Path) -> list[tuple[str, bool]]:
    name = rng.choice(["", "sub/", "sub/deeper/"]) + _inside_names(rng).rsplit("/", 1)[-1]
    esc, odd = rng.choice(ESCAPES), rng.choice(ODD)
    up = "/".join([".."] * rng.randint(1, 6))
    return [
        (str(allowed / name), True),
        (f"file://{quote(str(allowed / name))}", True),
        (str(allowed / "*.jsonl"), True),
        (str(outside / name), False),
        (f"{allowed}/{up}/{outside.name}/{name}", False),
        (f"{allowed}/sub/../{up}/etc/passwd.csv", False),
        (f"file://{allowed}/{up}/{outside.name}/{name}", False),
        (f"file://{quote(f'{allowed}/{up}/{outside.name}/{name}')}", False),
        (f"file://evil.example{allowed}/{name}", False),
        (str(allowed / "escape" / name), False),  # a link to the outside folder
        (str(allowed / "escape.jsonl"), False),  # a link to an outside file
        (f"{allowed}{odd}/{name}", False),
        (f"{allowed}-evil/{name}", False),
        (f"{allowed}/../{allowed.name}-evil/{name}", False),
        (f"{allowed}/{esc}/{name}".replace("%2e", "..").replace("%2E", ".."), None),
        (f"/{up}/{outside}/{name}", False),
        ("~/terms.jsonl", False),
        ("../../etc/shadow.csv", False),
        (f"{outside}/*.jsonl", False),
        (f"http://127.0.0.1/{name}", False),
        (f"//evil.example/{name}", False),
    ]


def _really_inside(source: str, allowed: Path) -> bool:
    """An independent oracle for local paths: the file's real location."""
    path = source[7:] if source.startswith("file://") else source
    real = os.path.realpath(path.split("*")[0])
    return real.startswith(str(allowed.resolve()) + os.sep)


#: the deployments fuzzed: (environment, whether TERMTUNE_ALLOWED_PATHS is set)
MODES = {
    "production": ("production", True),
    "development": ("development", True),
    "development, any local path": ("development", False),
}


def _distinct_cases(rng, size, allowed, outside) -> dict[str, bool | None]:
    """``size`` distinct locations (a repeated one is tried once), each with whether it is
    really inside an allowed location (None: judged by where it really points)."""
    cases: dict[str, bool | None] = {}
    for _ in range(100 * size):
        if len(cases) >= size:
            break
        for source, inside in _s3_cases(rng) + _local_cases(rng, allowed, outside):
            cases.setdefault(source, inside)
    return cases


def _local_anywhere(source: str, kind: str) -> bool:
    """Development without TERMTUNE_ALLOWED_PATHS takes any local path (by design): a local
    location accepted there is inside, whatever folder it names; never an S3 URI's typo."""
    return kind == "local" and source[:3].lower() != "s3:"


@pytest.mark.parametrize("mode", list(MODES))
def test_fuzzed_locations_are_never_accepted_outside(scenario, tmp_path, mode):
    environment, restricted = MODES[mode]
    outcome = scenario(
        f"fuzzed S3 URIs and local paths ({mode})",
        full=3000,
        ci=1000,
        must_hold="0 accepted outside the allowed locations; every location distinct"
        + ("" if restricted else "; local paths anywhere accepted, S3 still only as allowed"),
    )
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    (outside / "secret.jsonl").write_text("{}\n")
    (allowed / "escape.jsonl").symlink_to(outside / "secret.jsonl")
    settings = Settings(
        var_dir=tmp_path / "var",
        allowed_buckets=[BUCKET],
        allowed_paths=[allowed] if restricted else [],
        environment=environment,
    )
    cases = _distinct_cases(random.Random(20261128), outcome.size, allowed, outside)
    for source, inside in cases.items():
        outcome.count("distinct locations tried")
        try:
            kind = check_source(source, store_root=STORE, settings=settings)
        except StoreLocationError as exc:
            outcome.count("refused")
            outcome.check(
                "dataset.source" in str(exc), f"refusal of {source!r} does not name the field"
            )
            if inside and restricted:
                outcome.count("refused although inside")
            continue
        if not restricted and _local_anywhere(source, kind):
            inside = True
        elif inside is None:  # spelled oddly: judge by where it really points
            inside = kind == "local" and _really_inside(source, allowed)
        if inside:
            outcome.count("accepted inside")
        else:
            outcome.count("accepted outside")
            outcome.check(False, f"accepted outside: {source!r} ({kind})")
    tried = outcome.counts.get("distinct locations tried", 0)
    outcome.check(tried >= outcome.size, f"only {tried} distinct locations")
    outcome.check(outcome.counts.get("accepted inside", 0) > 0, "nothing inside was accepted")
    outcome.verdict()
