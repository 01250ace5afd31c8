"""The executor's use cases, one module each: accept a call, decide on an approval, execute a call, withdraw a
call, sweep, list approvals. They share the `Executor` (context.py) and the message builders (messages.py).

Exactly-once execution
----------------------
Every call has one row in the execution ledger, keyed by `call_id`, whose status only moves forward by
compare-and-set, in the same transaction as the messages it must publish (an outbox, published after the
commit with deterministic `Nats-Msg-Id`s, so a re-publish is a no-op):

    awaiting_approval --approve--> ready --claim--> running --record--> succeeded | failed
            |--deny--> denied      |--expire--> expired          \\--(executor lost)--> see below
            |--withdraw--> withdrawn (approval expired)  ready --withdraw--> withdrawn

- A call runs only from `ready`, which only a policy that needs no approval, or an accepted decision, sets.
- `running` is a claim under a lease the executor renews while the tool runs. A redelivered call or decision
  finds the row and runs nothing; it only re-publishes what is not yet published.
- An executor killed while a tool ran leaves `running` with a lapsing lease. The next executor to see it (on a
  redelivery or in its periodic sweep) takes it over, and then:
  * re-runs it when a re-run is safe: the effect commits in the ledger's own transaction (python tools
    declared `transactional`, like create_ticket: an interrupted run left nothing), or the tool is declared
    idempotent (an HTTP tool sending `Idempotency-Key: <call_id>`, kubectl apply, retrieval);
  * otherwise (shell commands, plain HTTP), or when the call's task has ended meanwhile, it does NOT run it
    again: the call ends `interrupted` and the model reads "execution_interrupted: outcome unknown".
Nothing is lost, nothing runs twice.
"""

from agentbus.tool_executor.service.accept_call import AcceptCall
from agentbus.tool_executor.service.context import Executor, LoadedTool
from agentbus.tool_executor.service.decide import Decide, DecisionOutcome, DecisionReport
from agentbus.tool_executor.service.execute import ExecuteCall
from agentbus.tool_executor.service.faults import FaultPoints
from agentbus.tool_executor.service.list_approvals import ListApprovals
from agentbus.tool_executor.service.metrics import ExecutorMetrics
from agentbus.tool_executor.service.sweep import Sweep
from agentbus.tool_executor.service.withdraw import WithdrawCall

__all__ = [
    "AcceptCall",
    "Decide",
    "DecisionOutcome",
    "DecisionReport",
    "ExecuteCall",
    "Executor",
    "ExecutorMetrics",
    "FaultPoints",
    "ListApprovals",
    "LoadedTool",
    "Sweep",
    "WithdrawCall",
]
