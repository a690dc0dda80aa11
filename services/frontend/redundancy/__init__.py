"""Redundancy policies, one per file: what happens to a batch, its answers and erasures.

| mode | class | file |
|---|---|---|
| ``none``, ``equal`` | ``Replication`` | ``replication.py`` |
| ``hedged`` | ``Hedged`` | ``hedged.py`` |
| ``cheap`` | ``Cheap`` | ``cheap.py`` |
| ``coded`` | ``Coded`` | ``coded.py`` |

``lateness.py`` holds the decode policy (``immediate`` / ``late``) that coded
and cheap mode share: when a substitute (reconstruction, backup answer) may
answer for a data batch.

A policy talks to the engine only through ``host.PolicyHost`` (public
methods, no ``_private`` access) and implements ``host.RedundancyPolicy``.
The engine receives a built policy (``make_policy``); ``policy_class(mode)``
tells a composition root which instance roles a mode uses without building
one. A policy never blocks and never touches another thread.
"""

from services.frontend.redundancy.cheap import Cheap
from services.frontend.redundancy.coded import Coded
from services.frontend.redundancy.hedged import Hedged
from services.frontend.redundancy.host import PolicyHost, RedundancyPolicy
from services.frontend.redundancy.lateness import DECODE_POLICIES, Lateness
from services.frontend.redundancy.replication import Replication

POLICIES = {"none": Replication, "equal": Replication, "coded": Coded, "cheap": Cheap, "hedged": Hedged}
MODES = tuple(POLICIES)

__all__ = ["DECODE_POLICIES", "MODES", "POLICIES", "Cheap", "Coded", "Hedged", "Lateness", "PolicyHost",
           "RedundancyPolicy", "Replication", "make_policy", "policy_class"]


def policy_class(mode):
    """The policy class of ``mode``; ValueError naming the choices if unknown."""
    try:
        return POLICIES[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r} ({'|'.join(MODES)})") from None


def make_policy(mode, *, k=2, coder=None, hedge_delay_s=None, hedge_initial_delay_s=0.05, lateness=None,
                pools=None, zero_output=None):
    """Builds the policy of ``mode`` from the settings that mode uses (others ignored).

    ``lateness``: the decode policy of coded and cheap mode (``Lateness``;
    default ``late`` with its default threshold settings). ``pools``: coded
    mode's pinned buffers (``coding.CodingPools``; None: the kernels allocate).
    ``zero_output``: coded mode pads partial groups with it (``Coded``; None: no padding).
    """
    cls = policy_class(mode)
    if cls is Coded:
        return Coded(k, coder, lateness, pools, zero_output)
    if cls is Cheap:
        return Cheap(lateness)
    if cls is Hedged:
        return Hedged(hedge_delay_s, hedge_initial_delay_s)
    policy = cls()
    policy.mode = mode      # "equal" is "none" with another deployment
    return policy
