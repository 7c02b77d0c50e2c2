"""Send messages to nodes through a Flower Grid and collect the replies, with a deadline.

A reply is a :class:`~flwr.app.Message`; a node that answers with an error, goes offline or does not
answer in time gives a :class:`NodeFailure` instead, with the reason. Replies that come after the
deadline are dropped: they are no longer pulled, and the SuperLink deletes them when the messages' TTL
(the deadline plus :data:`TTL_MARGIN`) runs out.
"""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class NodeFailure(RuntimeError):
    """A node did not give a usable reply: an error reply, offline, or no reply before the deadline."""


class NodeUnavailable(NodeFailure):
    """The node could not be reached, or did not answer in time (not an error raised by the ClientApp)."""


#: Flower error codes that mean "unreachable", not "the ClientApp raised": message or reply unavailable,
#: node unavailable
UNAVAILABLE_CODES = {3, 4, 5}


#: seconds between two pulls of the replies
POLL_SECONDS = 0.25
#: seconds a message outlives the deadline (so a missing reply reads "no reply", not "expired")
TTL_MARGIN = 60.0


def exchange(
    grid: Grid,
    contents: list[tuple[int | None, RecordDict]],
    message_type: str,
    *,
    timeout: float,
    group_id: str = "",
) -> list[Message | NodeFailure]:
    """Send each ``(node_id, content)``; return, in the same order, each reply or why there is none.

    Nodes that the SuperLink does not list as online fail at once; the others have ``timeout``
    seconds to answer.
    """
    online = set(grid.get_node_ids())
    results: list[Message | NodeFailure | None] = [None] * len(contents)
    messages, positions = [], []
    for i, (node_id, content) in enumerate(contents):
        if node_id is None:  # a client of a resumed run whose node has not come back
            results[i] = NodeUnavailable("its node has not come back since the run was resumed")
            continue
        if node_id not in online:
            results[i] = NodeUnavailable(f"node {node_id} is offline")
            continue
        messages.append(Message(content, dst_node_id=node_id, message_type=message_type,
                                ttl=timeout + TTL_MARGIN, group_id=group_id))
        positions.append(i)
    waiting: dict[str, int] = {}
    if messages:
        for i, msg_id in zip(positions, grid.push_messages(messages)):
            if msg_id is None:
                results[i] = NodeUnavailable(f"node {contents[i][0]}: the message could not be sent")
            else:
                waiting[msg_id] = i
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            i = waiting.pop(reply.metadata.reply_to_message_id, None)
            if i is None:
                continue
            if reply.has_error():
                reason = " ".join(str(reply.error.reason or f"error code {reply.error.code}").split())
                kind = NodeUnavailable if reply.error.code in UNAVAILABLE_CODES else NodeFailure
                results[i] = kind(f"node {contents[i][0]}: {reason}")
            else:
                results[i] = reply
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    for i in waiting.values():
        results[i] = NodeUnavailable(f"node {contents[i][0]}: no reply within {timeout:g} s")
    return [r if r is not None else NodeUnavailable("no result") for r in results]
