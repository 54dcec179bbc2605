"""The uplink's CPU scheduling policy: below the collector, whose receive loop must not wait for it.

`batch` (the default) is Linux's SCHED_BATCH: a waking batch task never preempts the task
running on its core (kernel/sched/fair.c, check_preempt_wakeup_fair: "Batch and idle tasks
do not preempt non-idle tasks"), so each round of the uplink starts on an idle core or at the
next tick instead of cutting into the collector at once, and it keeps its nice-weighted share of
a busy core (it must not fall behind ingest).  `idle` (SCHED_IDLE) runs only on what no other
task wants (weight 3 against 1,024: on a saturated gateway the uplink falls behind); `other`
(SCHED_OTHER) is the kernel's default.  sched(7).

The policy is taken at start, before any thread exists (threads inherit it).  Under systemd the
unit sets the same policy (CPUSchedulingPolicy=) before the daemon starts, so the daemon finds
it set and makes no call.
"""

from __future__ import annotations

import os

from ..errors import SetupError

POLICIES = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}
NAMES = {v: k for k, v in POLICIES.items()}


def parse(value: object) -> str:
    if not isinstance(value, str) or value not in POLICIES:
        raise ValueError(f"{value!r}: write one of {', '.join(POLICIES)}")
    return value


def current() -> str:
    """This process's policy by name (SCHED_FIFO and the like: their kernel number)."""
    policy = os.sched_getscheduler(0)
    return NAMES.get(policy, str(policy))


def apply(name: str) -> bool:
    """Run this process at policy `name` from now on; True if that changed it.  The kernel's
    refusal (SCHED_IDLE to another policy needs RLIMIT_NICE or CAP_SYS_NICE) is a SetupError."""
    if os.sched_getscheduler(0) == POLICIES[name]:
        return False
    try:
        os.sched_setscheduler(0, POLICIES[name], os.sched_param(0))
    except OSError as exc:
        raise SetupError(
            f"cannot run at scheduling policy {name} (now {current()}): {exc.strerror}; "
            "start the uplink at that policy (systemd: CPUSchedulingPolicy= in its unit) or set scheduling to "
            f"{current()}"
        ) from None
    return True
