"""Collecting human preferences in the browser: ``rlhf-lightning label``.

* :mod:`.candidates`: items to judge, from a JSONL file or sampled from a policy in the background;
* :mod:`.storage`: the append-only, fsync'ed, locked annotations file (undo is an event);
* :mod:`.app`: the Flask app and its static page (optional extra ``rlhf-lightning[label]``);
* :mod:`.export`: annotations -> preference pairs for the reward stage, and annotator agreement;
* :mod:`.cli`: the ``label`` and ``label export`` commands.

Only :mod:`.app` (and serving) needs Flask; the rest works with the base install.
"""

from .candidates import (
    CandidateGenerator,
    CandidatePool,
    Item,
    SamplingSettings,
    read_candidates,
)
from .export import agreement, export_annotations, judgement_pairs
from .storage import AnnotationLog, judgements, read_annotations, read_log

__all__ = [
    "AnnotationLog",
    "CandidateGenerator",
    "CandidatePool",
    "Item",
    "SamplingSettings",
    "agreement",
    "export_annotations",
    "judgement_pairs",
    "judgements",
    "read_annotations",
    "read_candidates",
    "read_log",
]
