"""Finding the optic disc in a whole photograph with the trained model itself (issue 22).

`locate_disc`: a coarse pass of windows of the training framing over the field of view, where
the windows vote for the places they see a disc (a model trained on regions that always hold a
disc makes one up in almost any window, but such discs do not agree between overlapping
windows), then refinement (a window of the training framing re-centred on the predicted disc)
and verification (shifted windows: a real disc stays put, a made-up one moves with the window).
Returns a `Localisation` with its crop box, a confidence and the flags `no_disc`,
`two_candidates`, `at_edge` with reasons.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from puseg_jax.external.photo_checks import (
    FieldOfView,
    bright_spots,
    check_photo,
    equivalent_diameter,
    field_of_view,
    largest_component,
)
from puseg_jax.external.photos import (
    DISC_THRESHOLD,
    Box,
    Framing,
    PredictFn,
    coarse_boxes,
    framing_value,
    predict_boxes,
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A disc the model predicted in one window, in photograph pixels.

    Attributes:
      centre: (row, col) of the predicted disc's centroid.
      diameter: its equivalent diameter.
      score: in [0, 1] (see `_measure`; after verification times `anchoring`).
      box: the window it was predicted in.
      ratio: the predicted diameter over the window's side (the framing the model saw).
      probability, uncertainty: mean disc probability and mean uncertainty inside the disc.
      fill: disc area over the area of the ellipse in its bounding box (1 for an ellipse).
      touches_edge: the disc touches the window's edge (cut off: centre and size biased).
      votes: coarse pass: the summed scores of the windows that see a disc at this place.
      anchoring: after verification: 1 when windows shifted around the disc see it at the same
        place in the photograph, 0 when the predicted disc moves with the window.
    """

    centre: tuple[float, float]
    diameter: float
    score: float
    box: Box
    ratio: float
    probability: float
    uncertainty: float
    fill: float
    touches_edge: bool
    votes: float = 0.0
    anchoring: float = 1.0


def _size_match(ratio: float, framing: float, tolerance: float) -> float:
    """exp(-(ln(ratio / framing) / ln(tolerance))^2 / 2): 1 at the framing, 0.61 at a factor of
    `tolerance` either way."""
    return math.exp(-0.5 * (math.log(ratio / framing) / math.log(tolerance)) ** 2)


def _measure(
    prob: np.ndarray, unc: np.ndarray, box: Box, framing: float, tolerance: float
) -> Candidate | None:
    """The disc predicted in one window, or None (no pixel above the threshold)."""
    s = prob.shape[0]
    disc = largest_component(prob > DISC_THRESHOLD)
    area = int(disc.sum())
    if area == 0:
        return None
    rows, cols = np.nonzero(disc)
    scale = box.side / s  # photograph pixels per network pixel
    # Index coordinates on the network grid -> continuous -> photograph index coordinates.
    row = box.top + (rows.mean() + 0.5) * scale - 0.5
    col = box.left + (cols.mean() + 0.5) * scale - 0.5
    diameter_net = equivalent_diameter(area)
    bbox_h, bbox_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = min(1.0, area / (math.pi / 4 * bbox_h * bbox_w))
    touches = bool(rows.min() == 0 or cols.min() == 0 or rows.max() == s - 1 or cols.max() == s - 1)
    p_in = float(prob[disc].mean())
    u_in = float(np.clip(unc[disc], 0.0, 1.0).mean())
    ratio = diameter_net / s
    # Why these factors: a real disc is predicted with high probability and low uncertainty
    # inside (hallucinated discs in vessels or bright reflexes are doubtful), as one compact
    # ellipse, at about the framing the model was trained on, and whole (not cut by the window).
    score = (
        p_in
        * (1.0 - u_in)
        * fill
        * _size_match(ratio, framing, tolerance)
        * (0.5 if touches else 1.0)
    )
    return Candidate(
        centre=(float(row), float(col)),
        diameter=float(diameter_net * scale),
        score=float(score),
        box=box,
        ratio=float(ratio),
        probability=p_in,
        uncertainty=u_in,
        fill=float(fill),
        touches_edge=touches,
    )


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Where the disc is in a photograph, the region to crop and how sure the search is.

    Attributes:
      centre: (row, col) of the disc in photograph pixels; None when no disc was found.
      diameter: the disc's equivalent diameter in photograph pixels (None: not found).
      box: the region to predict: centred on the disc, side diameter / framing (None: not
        found).
      confidence: the chosen candidate's score in [0, 1] (0: none).
      flags: {flag: reason} for 'no_disc', 'two_candidates', 'at_edge' (empty: no doubt).
      candidates: the refined candidates, best first.
      n_windows: windows predicted (coarse and refinement).
      seconds: wall time of the search.
    """

    centre: tuple[float, float] | None
    diameter: float | None
    box: Box | None
    confidence: float
    flags: dict[str, str]
    candidates: tuple[Candidate, ...] = ()
    n_windows: int = 0
    seconds: float = 0.0

    @property
    def found(self) -> bool:
        return self.box is not None and "no_disc" not in self.flags

    def message(self) -> str:
        """One console line."""
        if self.centre is None or self.box is None:
            where = "no disc"
        else:
            where = (
                f"disc at ({self.centre[0]:.0f}, {self.centre[1]:.0f}), diameter "
                f"{self.diameter:.0f} px, region {self.box.side} px, confidence "
                f"{self.confidence:.2f}"
            )
        doubts = "; ".join(f"{k}: {v}" for k, v in self.flags.items())
        return where + (f" [{doubts}]" if doubts else "")

    def as_row(self) -> dict[str, Any]:
        """Columns for review.csv / per-case tables."""
        c = self.centre or (math.nan, math.nan)
        b = self.box.as_tuple() if self.box else (None, None, None)
        return {
            "loc_row": round(c[0], 1),
            "loc_col": round(c[1], 1),
            "loc_diameter": None if self.diameter is None else round(self.diameter, 1),
            "loc_box": None if self.box is None else "{}/{}/{}".format(*b),
            "loc_confidence": round(self.confidence, 4),
            "loc_flags": "|".join(self.flags),
        }


def _suppress(
    cands: Sequence[Candidate], radius: float, keep: int, key: str = "score"
) -> list[Candidate]:
    """Best-first candidates (by `key`), dropping any within `radius` disc diameters of a kept
    one."""
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: -getattr(c, key)):
        far = all(
            math.dist(c.centre, k.centre) > radius * max(c.diameter, k.diameter) for k in kept
        )
        if far:
            kept.append(c)
        if len(kept) == keep:
            break
    return kept


def _vote(cands: Sequence[Candidate], radius: float) -> list[Candidate]:
    """Each candidate with `votes`: the summed scores of all candidates (its own included)
    whose centres lie within `radius` disc diameters of it.

    Why: a model trained on regions that always hold a disc "sees" a disc in almost any window,
    usually near the window's centre, at the training framing. Such hallucinations do not
    agree between overlapping windows (each sits at its own window's centre), while a real disc
    is predicted at the same place of the photograph by every window that shows it.
    """
    if not cands:
        return []
    centres = np.array([c.centre for c in cands])
    diameters = np.array([c.diameter for c in cands])
    scores = np.array([c.score for c in cands])
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    near = dist < radius * np.maximum(diameters[:, None], diameters[None])
    votes = near.astype(np.float64) @ scores
    return [dataclasses.replace(c, votes=float(v)) for c, v in zip(cands, votes, strict=True)]


def _shifted(box: Box, shift: float, diagonal: bool = False) -> list[Box]:
    """The box moved by `shift` of its side: up, down, left and right, or (`diagonal`) up-left
    and down-right."""
    d = int(round(shift * box.side))
    if diagonal:
        return [Box(box.top - d, box.left - d, box.side), Box(box.top + d, box.left + d, box.side)]
    return [
        Box(box.top - d, box.left, box.side),
        Box(box.top + d, box.left, box.side),
        Box(box.top, box.left - d, box.side),
        Box(box.top, box.left + d, box.side),
    ]


def _check(
    photo: np.ndarray,
    seeds: Sequence[Candidate],
    predict_fn: PredictFn,
    framing: float,
    input_size: int,
    shift: float,
    diagonal: bool,
    batch_size: int,
) -> tuple[list[Candidate], int]:
    """One refinement step with its anchoring test, for every seed at once.

    Each seed gets a window of the training framing centred on its disc (1.5 times larger while
    the disc touches its window's edge: its size is then underestimated) and the same window
    shifted (`_shifted`). The refined candidate is the disc in the centred window; its
    anchoring is 1 - the mean distance the disc moved in the shifted windows over the shift: a
    real disc stays where it is in the photograph (1), a made-up one moves with the window (0).
    Its score is multiplied by the anchoring.

    Returns:
      (checked candidates, seeds whose centred window shows no disc dropped; windows predicted).
    """
    n_shift = 2 if diagonal else 4
    centred = [
        Box.around(*c.centre, (c.diameter / framing) * (1.5 if c.touches_edge else 1.0))
        for c in seeds
    ]
    boxes = []
    for b in centred:
        boxes += [b] + _shifted(b, shift, diagonal)
    probs, uncs = predict_boxes(photo, boxes, predict_fn, input_size, batch_size)
    out = []
    step = 1 + n_shift
    for i, c in enumerate(seeds):
        # At the training framing the disc should come out at the framing: a tight size term.
        k = step * i
        r = _measure(probs[k], uncs[k], boxes[k], framing, 1.35)
        if r is None:
            continue
        moved = []
        for j in range(k + 1, k + step):
            m = _measure(probs[j], uncs[j], boxes[j], framing, 1.35)
            offset = math.dist(boxes[j].centre, boxes[k].centre)
            moved.append(1.0 if m is None else min(1.0, math.dist(m.centre, r.centre) / offset))
        anchoring = float(1.0 - np.mean(moved))
        out.append(
            dataclasses.replace(r, votes=c.votes, anchoring=anchoring, score=r.score * anchoring)
        )
    return out, len(boxes)


def _search(
    photo: np.ndarray,
    fov: FieldOfView,
    predict_fn: PredictFn,
    framing: float,
    input_size: int,
    disc_scales: Sequence[float],
    stride: float,
    screen_k: int,
    n_bright: int,
    top_k: int,
    shift: float,
    batch_size: int,
) -> tuple[list[Candidate], int]:
    """One coarse pass, screening and verification (see `locate_disc`).

    Returns:
      (verified candidates, best first by score, windows predicted).
    """
    boxes = coarse_boxes(photo.shape, fov, framing, disc_scales, stride)
    probs, uncs = predict_boxes(photo, boxes, predict_fn, input_size, batch_size)
    n_windows = len(boxes)
    # Coarse windows are at a guessed scale: a disc of another size than guessed is still a
    # good seed, so the size term is loose here (a factor 2 costs 40 %).
    cands = [_measure(p, u, b, framing, 2.0) for p, u, b in zip(probs, uncs, boxes, strict=True)]
    seeds = _suppress(_vote([c for c in cands if c is not None], 0.25), 1.0, screen_k, "votes")
    # Bright spots as extra seeds, at the pass's middle scale; the screening measures their size.
    diameter = float(np.exp(np.mean(np.log(disc_scales)))) * fov.diameter
    for row, col in bright_spots(photo, fov, diameter, n_bright):
        box = Box.around(row, col, diameter / framing)
        # Kept unless a model seed is at the same place: a seed a little off can be a model
        # candidate cut by its window, refined to the wrong place.
        if all(math.dist((row, col), c.centre) > 0.25 * c.diameter for c in seeds):
            seeds.append(Candidate((row, col), diameter, 0.0, box, framing, 0.0, 1.0, 0.0, False))
    if not seeds:
        return [], n_windows
    # Screening: many seeds, two shifted windows each; then the best few, four each.
    checked, n = _check(photo, seeds, predict_fn, framing, input_size, shift, True, batch_size)
    n_windows += n
    seeds = _suppress(checked, 1.0, top_k)
    if not seeds:
        return [], n_windows
    verified, n = _check(photo, seeds, predict_fn, framing, input_size, shift, False, batch_size)
    n_windows += n
    return sorted(verified, key=lambda c: -c.score), n_windows


def locate_disc(
    photo: np.ndarray,
    predict_fn: PredictFn,
    framing: Framing | float,
    input_size: int,
    *,
    disc_scales: Sequence[float] = (0.16,),
    fallback_scales: Sequence[float] = (0.1, 0.25),
    stride: float = 0.5,
    screen_k: int = 6,
    n_bright: int = 3,
    top_k: int = 3,
    shift: float = 0.2,
    batch_size: int = 32,
    min_confidence: float = 0.15,
    fallback_below: float = 0.3,
    two_candidate_ratio: float = 0.8,
    edge_margin: float = 0.25,
    name: str = "",
) -> Localisation:
    """Finds the optic disc in a whole photograph with the trained model itself.

    1. Coarse pass: windows of the training framing (side = candidate disc diameter / framing)
       on a grid of step `stride` * side over the field of view, for candidate disc diameters
       `disc_scales` (fractions of the field of view's diameter), predicted in batches. Each
       window's largest predicted disc is a candidate, scored by its mean probability,
       (1 - mean uncertainty), its ellipse-likeness, its size against the training framing and
       whether the window cut it off; candidates then vote (`_vote`): the summed scores of the
       windows that see a disc at the same place (within a quarter diameter).
    2. Screening: the `screen_k` candidates with the most votes, more than a disc diameter
       apart, and the `n_bright` brightest spots of the field at the scale of a disc
       (`bright_spots`: the disc is usually the brightest round spot, and the coarse windows,
       which cut it, can miss it) are refined: a window of the training framing centred on the
       predicted disc, at the side its measured diameter implies, predicted with two windows
       shifted diagonally by `shift` of the side. Anchoring (`_check`): a real disc stays
       where it is in the photograph, a made-up one moves with the window; the score is
       multiplied by it. A bright spot where the model sees no disc that stays put scores 0:
       the model decides, the brightness only proposes.
    3. Verification: the `top_k` screened candidates are refined once more, with four shifted
       windows.
    4. When the best verified score is under `fallback_below`, steps 1-3 run again at
       `fallback_scales` (discs much smaller or larger in the field than usual) and the better
       result is kept.

    The best verified candidate gives the centre, the diameter and the crop box (centred on it,
    side = diameter / framing); flags say when it is doubtful.

    The defaults: discs are 0.13-0.22 of the field of view's diameter in the shared photographs
    (two cameras, REFUGE and PAPILA), and windows made for 0.16 see discs of about 0.09-0.25
    (the model saw framings of 0.37-0.95 in training); the fallback covers about 0.06-0.4.

    Args:
      photo: uint8 [H, W, 3].
      predict_fn: the model (see the module's docstring).
      framing: the training framing (`training_framing`).
      input_size: the network input side s.
      disc_scales: candidate disc diameters over the field of view's diameter, first pass.
      fallback_scales: the same for the second pass (empty: none).
      stride: the coarse grid's step over the window side.
      screen_k: model candidates screened (3 windows each).
      n_bright: bright spots screened too (`bright_spots`; 0: the model's candidates only).
      top_k: candidates verified (5 windows each).
      shift: the shifted windows' offset over the side.
      batch_size: most windows per `predict_fn` call (batches are padded to `batch_sizes`).
      min_confidence: below this the best candidate is 'no_disc'.
      fallback_below: below this the fallback pass runs.
      two_candidate_ratio: a second candidate, more than 1.5 diameters away, scoring at least
        this fraction of the best, sets 'two_candidates'.
      edge_margin: the disc's edge closer than this many diameters to the photograph's border
        (or more than a fifth of the disc outside the field of view) sets 'at_edge'.
      name: the image's name, for messages.

    Returns:
      The `Localisation`.

    Raises:
      PhotoError: the photograph fails `check_photo`.
    """
    t0 = time.perf_counter()
    f = framing_value(framing)
    photo = check_photo(photo, input_size, name)
    fov = field_of_view(photo)
    args = (photo, fov, predict_fn, f, input_size)
    rest = (stride, screen_k, n_bright, top_k, shift, batch_size)
    seeds, n_windows = _search(*args, disc_scales, *rest)
    if fallback_scales and (not seeds or seeds[0].score < fallback_below):
        more, n_more = _search(*args, fallback_scales, *rest)
        n_windows += n_more
        seeds = _suppress(seeds + more, 1.0, top_k)
    seconds = time.perf_counter() - t0
    if not seeds or seeds[0].score < min_confidence:
        if not seeds:
            why = f"the model predicted no disc in any of {n_windows} windows"
        else:
            b = seeds[0]
            why = (
                f"best candidate's confidence {b.score:.2f} is under {min_confidence} "
                f"(disc probability {b.probability:.2f}, uncertainty {b.uncertainty:.2f}, size "
                f"{b.ratio:.2f} of its window against {f:.2f}, anchoring {b.anchoring:.2f})"
            )
        best = seeds[0] if seeds else None
        return Localisation(
            centre=best.centre if best else None,
            diameter=best.diameter if best else None,
            box=Box.around(*best.centre, best.diameter / f) if best else None,
            confidence=best.score if best else 0.0,
            flags={"no_disc": why},
            candidates=tuple(seeds),
            n_windows=n_windows,
            seconds=seconds,
        )
    best = seeds[0]
    flags: dict[str, str] = {}
    for other in seeds[1:]:
        dist = math.dist(best.centre, other.centre) / best.diameter
        if dist > 1.5 and other.score >= two_candidate_ratio * best.score:
            flags["two_candidates"] = (
                f"a second disc-like candidate at ({other.centre[0]:.0f}, {other.centre[1]:.0f}),"
                f" {dist:.1f} disc diameters away, scores {other.score:.2f} against "
                f"{best.score:.2f}"
            )
            break
    h, w = photo.shape[:2]
    row, col = best.centre
    radius = best.diameter / 2
    gaps = {"top": row - radius, "left": col - radius, "bottom": h - 1 - row - radius}
    gaps["right"] = w - 1 - col - radius
    side, gap = min(gaps.items(), key=lambda kv: kv[1])
    if gap < edge_margin * best.diameter:
        flags["at_edge"] = (
            f"the disc's edge is {gap:.0f} px ({gap / best.diameter:.2f} diameters) from the "
            f"photograph's {side} border"
        )
    elif fov.found and fov.fraction_outside(row, col, radius) > 0.2:
        outside = fov.fraction_outside(row, col, radius)
        flags["at_edge"] = f"{outside:.0%} of the disc lies outside the field of view"
    return Localisation(
        centre=best.centre,
        diameter=best.diameter,
        box=Box.around(row, col, best.diameter / f),
        confidence=best.score,
        flags=flags,
        candidates=tuple(seeds),
        n_windows=n_windows,
        seconds=seconds,
    )
