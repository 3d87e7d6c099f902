"""The training precision: float32, or mixed bfloat16 / float16 (float32 weights), chosen per device.

:func:`lib.common.device.choose_precision` holds the decision table; this sets the Keras
policy for the length of a run and says what was chosen and why (the log line and
``model.json``'s ``precision``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ..common.device import POLICIES, choose_precision, device_facts


@contextlib.contextmanager
def precision_policy(requested, log: Callable[[str], None], facts=None) -> Iterator[tuple[str, str]]:
    """Set the Keras global policy of the precision chosen for ``requested`` (TrainConfig's
    ``mixed_precision``) on this device; yield ``(precision, reason)``; restore the previous policy.

    bfloat16 needs no loss scaling (float32's exponent range); float16 does
    (:func:`lib.training.step.make_optimizer`). The output layers stay float32 (the models'
    own policy), so losses and probabilities are float32 in every precision.
    """
    import keras

    precision, reason = choose_precision(requested, device_facts() if facts is None else facts)
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    shown = {"float32": "float32", "bfloat16": "mixed bfloat16", "float16": "mixed float16 with dynamic loss scaling"}
    log(f"precision: {shown[precision]} ({reason})")
    try:
        yield precision, reason
    finally:
        keras.mixed_precision.set_global_policy(previous)
