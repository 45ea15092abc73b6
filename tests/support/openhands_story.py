"""The OpenHands SDK's LLM streaming example (``29_llm_streaming.py``) with a costream publisher.

Run by ``tests/test_openhands.py`` with the python of ``.venv-openhands`` (openhands-sdk
needs Python >= 3.12), in the workspace directory. The example is the seed's, line for
line, but for what is marked ``costream:``: the publisher made from the environment
(``COSTREAM_WRITE_LINK``, or ``COSTREAM_REDIS_URL`` and ``COSTREAM_CONVERSATION_ID``) and
passed in the two callback lists; ``on_token`` writes to ``ON_TOKEN_FILE`` rather than
stdout (OpenHands' own console output goes there); and after each ``run()`` a
``COSTREAM_METRICS {json}`` line gives what OpenHands' metrics counted for that run.
"""

import json
import os
from typing import Literal

from openhands.sdk import (
    Conversation,
    get_logger,
)
from openhands.sdk.llm import LLM
from openhands.sdk.llm.streaming import ModelResponseStream
from openhands.tools.preset.default import get_default_agent
from pydantic import SecretStr

from costream.publisher import TokenPublisher  # costream:

logger = get_logger(__name__)

out = open(os.environ["ON_TOKEN_FILE"], "w", encoding="utf-8")  # costream: on_token's output

api_key = os.getenv("LLM_API_KEY") or os.getenv("OPENAI_API_KEY")
if not api_key:
    raise RuntimeError("Set LLM_API_KEY or OPENAI_API_KEY in your environment.")

model = os.getenv("LLM_MODEL", "anthropic/claude-sonnet-4-5-20250929")
base_url = os.getenv("LLM_BASE_URL")
llm = LLM(
    model=model,
    api_key=SecretStr(api_key),
    base_url=base_url,
    usage_id="stream-demo",
    stream=True,
)

agent = get_default_agent(llm=llm, cli_mode=True)


# Define streaming states
StreamingState = Literal["thinking", "content", "tool_name", "tool_args"]
# Track state across on_token calls for boundary detection
_current_state: StreamingState | None = None


def on_token(chunk: ModelResponseStream) -> None:
    """
    Handle all types of streaming tokens including content,
    tool calls, and thinking blocks with dynamic boundary detection.
    """
    global _current_state

    choices = chunk.choices
    for choice in choices:
        delta = choice.delta
        if delta is not None:
            # Handle thinking blocks (reasoning content)
            reasoning_content = getattr(delta, "reasoning_content", None)
            if isinstance(reasoning_content, str) and reasoning_content:
                if _current_state != "thinking":
                    if _current_state is not None:
                        out.write("\n")
                    out.write("THINKING: ")
                    _current_state = "thinking"
                out.write(reasoning_content)
                out.flush()

            # Handle regular content
            content = getattr(delta, "content", None)
            if isinstance(content, str) and content:
                if _current_state != "content":
                    if _current_state is not None:
                        out.write("\n")
                    out.write("CONTENT: ")
                    _current_state = "content"
                out.write(content)
                out.flush()

            # Handle tool calls
            tool_calls = getattr(delta, "tool_calls", None)
            if tool_calls:
                for tool_call in tool_calls:
                    tool_name = tool_call.function.name if tool_call.function.name else ""
                    tool_args = tool_call.function.arguments if tool_call.function.arguments else ""
                    if tool_name:
                        if _current_state != "tool_name":
                            if _current_state is not None:
                                out.write("\n")
                            out.write("TOOL NAME: ")
                            _current_state = "tool_name"
                        out.write(tool_name)
                        out.flush()
                    if tool_args:
                        if _current_state != "tool_args":
                            if _current_state is not None:
                                out.write("\n")
                            out.write("TOOL ARGS: ")
                            _current_state = "tool_args"
                        out.write(tool_args)
                        out.flush()


# costream: the publisher, through the server (the write link) or straight into Redis.
if os.getenv("COSTREAM_REDIS_URL"):
    publisher = TokenPublisher(
        redis_url=os.environ["COSTREAM_REDIS_URL"],
        conversation_id=os.environ["COSTREAM_CONVERSATION_ID"],
    )
else:
    publisher = TokenPublisher(url=os.environ["COSTREAM_WRITE_LINK"])

conversation = Conversation(
    agent=agent,
    workspace=os.getcwd(),
    token_callbacks=[on_token, publisher],  # costream: publisher added
    callbacks=[publisher],  # costream: added
)


def report_metrics(before: tuple[int, int, float]) -> tuple[int, int, float]:
    """costream: what OpenHands' metrics counted since ``before``."""
    usage = llm.metrics.accumulated_token_usage
    now = (
        usage.prompt_tokens if usage else 0,
        usage.completion_tokens if usage else 0,
        llm.metrics.accumulated_cost,
    )
    counted = {
        "input": now[0] - before[0],
        "output": now[1] - before[1],
        "cost": now[2] - before[2],
    }
    print("COSTREAM_METRICS " + json.dumps(counted), flush=True)
    return now


story_prompt = (
    "Tell me a long story about LLM streaming, write it a file, "
    "make sure it has multiple paragraphs. "
)
conversation.send_message(story_prompt)
print("Token Streaming:")
print("-" * 100 + "\n")
conversation.run()
counted = report_metrics((0, 0, 0.0))  # costream:

cleanup_prompt = (
    "Thank you. Please delete the streaming story file now that I've read it, "
    "then confirm the deletion."
)
conversation.send_message(cleanup_prompt)
print("Token Streaming:")
print("-" * 100 + "\n")
conversation.run()
report_metrics(counted)  # costream:

# Report cost
cost = llm.metrics.accumulated_cost
print(f"EXAMPLE_COST: {cost}")
print(f"COSTREAM_PUBLISHER errors={publisher.errors} dropped={publisher.dropped}")  # costream:
