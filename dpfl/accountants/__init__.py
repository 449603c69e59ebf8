"""Privacy accounting: Opacus' RDP, PRV and GDP accountants, a PLD accountant (dp_accounting),
calibration, and the ledger.

Importing it costs numpy and scipy only: Opacus (and torch) and dp_accounting are imported when an
accountant that needs them is first used (:mod:`dpfl.accountants.epsilon`)."""

from dpfl.accountants.calibrate import Calibration, calibrate_noise
from dpfl.accountants.epsilon import (
    ACCOUNTANTS,
    BOUNDING_ACCOUNTANTS,
    compute_epsilon,
    create_opacus_accountant,
)
from dpfl.accountants.ledger import MECHANISMS, PrivacyEvent, PrivacyLedger
from dpfl.accountants.phases import (
    MAX_STEPS,
    Phase,
    merge_phases,
    phases_from_records,
    steps_for_epochs,
)

__all__ = [
    "ACCOUNTANTS",
    "BOUNDING_ACCOUNTANTS",
    "MAX_STEPS",
    "MECHANISMS",
    "Calibration",
    "Phase",
    "PrivacyEvent",
    "PrivacyLedger",
    "calibrate_noise",
    "compute_epsilon",
    "create_opacus_accountant",
    "merge_phases",
    "phases_from_records",
    "steps_for_epochs",
]
