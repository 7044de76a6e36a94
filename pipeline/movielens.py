"""Replay of MovieLens (ml-latest-small) as an event stream, in timestamp order.

Each rating is an impression of that movie to that user; a rating >= 4.0 is also a click, a
moment later.  Dataset time is compressed by ``movielens_speedup`` and anchored at the replay's
start, so event times are "now"-like (the feature job rejects absurd event times) and the original
timestamp travels in the impression's context.
"""
from __future__ import annotations

import csv
import heapq
import random
from pathlib import Path
from typing import Iterator

from odl.config import SourceConfig
from odl.schemas import Click, Impression
from pipeline.generator import Record

CLICK_THRESHOLD = 4.0


def load_genres(directory: Path) -> dict[int, int]:
    """movie id -> index of its first genre (the item category); empty if movies.csv is absent."""
    path = Path(directory) / "movies.csv"
    if not path.is_file():
        return {}
    vocab: dict[str, int] = {}
    out = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                genre = (row.get("genres") or "").split("|")[0]
                out[int(row["movieId"])] = vocab.setdefault(genre, len(vocab) + 1)
            except (KeyError, ValueError):
                continue  # a bad movie row only costs that movie its category
    return out


def load_ratings(directory: Path) -> list[tuple[int, int, int, float]]:
    """(timestamp, user_id, movie_id, rating) sorted by timestamp; raises with the file named."""
    path = Path(directory) / "ratings.csv"
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens ratings not found at {path} (source.movielens_dir)")
    rows = []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            try:
                rows.append((int(row["timestamp"]), int(row["userId"]), int(row["movieId"]),
                             float(row["rating"])))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{i + 2}: malformed rating row {row!r}: {exc}") from None
    rows.sort()
    return rows


class MovieLensReplay:
    def __init__(self, cfg: SourceConfig, start_ms: int):
        self.cfg = cfg
        self.start_ms = start_ms
        self.rng = random.Random(cfg.seed)

    def records(self) -> Iterator[Record]:
        ratings = load_ratings(self.cfg.movielens_dir)
        genres = load_genres(self.cfg.movielens_dir)
        if not ratings:
            return
        t0 = ratings[0][0]
        pending: list[Record] = []
        lo, hi = self.cfg.click_delay_s
        for n, (ts, user, movie, rating) in enumerate(ratings):
            if self.cfg.max_events is not None and n >= self.cfg.max_events:
                break
            now_ms = self.start_ms + int((ts - t0) * 1000 / self.cfg.movielens_speedup)
            while pending and pending[0].due_ms <= now_ms:
                yield heapq.heappop(pending)
            rid = f"ml-{user}-{ts}-{movie}"
            hour = (ts // 3600) % 24
            # the rating itself is the label's source: it must never travel as a feature
            cat = genres.get(movie, 0)
            imp = Impression(rid, user, movie, 0, now_ms,
                             {"hour": int(hour), "orig_ts": ts, "category": cat})
            yield Record(now_ms, str(user).encode(), imp.to_json(), now_ms)
            if rating >= CLICK_THRESHOLD:
                cts = now_ms + int(1000 * self.rng.uniform(lo, hi))
                clk = Click(rid, user, movie, cts, {"category": cat})
                heapq.heappush(pending, Record(cts, str(user).encode(), clk.to_json(), cts, "click"))
        while pending:
            yield heapq.heappop(pending)


def write_log(directory: Path, out: Path) -> int:
    """The ratings as one CSV log in ``specs/movielens.yaml``'s layout (ts_ms, user_id, movie_id,
    genres as a ``|`` list, rating), in time order; returns the rows written."""
    genres: dict[int, str] = {}
    movies = Path(directory) / "movies.csv"
    if movies.is_file():
        with movies.open(newline="") as fh:
            for row in csv.DictReader(fh):
                g = row.get("genres") or ""
                if row.get("movieId", "").isdigit():
                    genres[int(row["movieId"])] = "" if g == "(no genres listed)" else g
    ratings = load_ratings(directory)
    with Path(out).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts_ms", "user_id", "movie_id", "genres", "rating"])
        for ts, user, movie, rating in ratings:
            w.writerow([ts * 1000, user, movie, genres.get(movie, ""), rating])
    return len(ratings)
