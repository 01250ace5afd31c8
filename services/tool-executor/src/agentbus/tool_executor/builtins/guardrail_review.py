"""`guardrail_review`: a task input or answer an agent's guardrails hold for an approver.

The runner sends the held text as a call of this tool, which waits in the approval inbox like any risky call.
Running it is the release: it runs only once an approver approved, and its result tells the runner to go on.
A denial or an expiry never runs it, and the runner fails the task `guardrail_blocked`.
"""

from __future__ import annotations

from typing import Any

from agentbus.tool_executor.adapters.runners import PythonToolContext
from agentbus.tool_executor.ports import ToolOutput


async def release(arguments: dict[str, Any], context: PythonToolContext) -> ToolOutput:
    return ToolOutput(True, f"The held {arguments['stage']} was released for task {context.invocation.task_id}.")
