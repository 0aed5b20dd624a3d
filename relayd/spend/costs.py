"""Which OpenAI calls cost money, and how each is metered.

Metering happens where every face's request goes upstream (``relayd/relay.py``
``exchange`` and the realtime bridge), keyed by the *upstream* call: a GPT Action
that starts a background response is metered as ``createResponse``, its poll as
``getResponse``, a ``/v1/proxy`` envelope as the call inside it, an MCP tool as the
route it runs. This table therefore names the OpenAI-shaped routes only, by
operationId; ``tests/test_spend_routes.py`` walks the route table and fails on any
OpenAI route missing here, so a new paid route cannot go unmetered.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = ["COSTS", "RELAYING_GROUPS", "Cost", "cost_of"]


class Cost(StrEnum):
    FREE = "free"  # costs nothing (or nothing usage can tell): not metered
    TOKENS = "tokens"  # JSON body names the model; the answer's usage is priced
    IMAGES = "images"  # as TOKENS; without usage, the flat price per image
    VIDEOS = "videos"  # the flat price per video second
    # Usage happens out of relayd's sight (ephemeral secrets, WebRTC calls, batches):
    # the key's model rule and budgets are checked, nothing is reserved.
    GATE = "gate"
    POLL = "poll"  # free, but settles a background response it sees finished
    REALTIME = "realtime"  # the WebSocket bridge: each response.done is priced


# Groups whose routes answer by themselves (meta, metrics, the OAuth server) or relay
# to other paths (wrappers, envelopes, tools, the catch-all): metered through the
# upstream calls they make, if any, never by themselves.
RELAYING_GROUPS: Final = frozenset(
    {"meta", "metrics", "actions", "proxy", "policy", "mcp", "oauth"}
)

_T, _F, _G = Cost.TOKENS, Cost.FREE, Cost.GATE

COSTS: Final[dict[str, Cost]] = {
    # responses
    "createResponse": _T,
    "createResponseStream": _T,
    "getInputTokenCounts": _F,
    "compactConversation": _T,
    "getResponse": Cost.POLL,
    "deleteResponse": _F,
    "cancelResponse": _F,
    "listInputItems": _F,
    # chat, embeddings, moderations, audio
    "createChatCompletion": _T,
    "listChatCompletions": _F,
    "getChatCompletion": _F,
    "updateChatCompletion": _F,
    "deleteChatCompletion": _F,
    "getChatCompletionMessages": _F,
    "createEmbedding": _T,
    "createModeration": _F,  # free at OpenAI
    "createSpeech": _T,
    "createTranscription": _T,
    "createTranslation": _T,
    # images and videos
    "createImage": Cost.IMAGES,
    "createImageEdit": Cost.IMAGES,
    "createImageVariation": Cost.IMAGES,
    "createVideo": Cost.VIDEOS,
    "createVideoEdit": Cost.VIDEOS,
    "createVideoExtension": Cost.VIDEOS,
    "createVideoRemix": Cost.VIDEOS,
    "createVideoCharacter": _F,
    "listVideos": _F,
    "getVideoCharacter": _F,
    "getVideo": _F,
    "deleteVideo": _F,
    "retrieveVideoContent": _F,
    # realtime
    "connectRealtime": Cost.REALTIME,
    "connectRealtimeWs": Cost.REALTIME,
    "createRealtimeClientSecret": _G,
    "createRealtimeCall": _G,
    "acceptRealtimeCall": _G,
    "hangupRealtimeCall": _F,
    "referRealtimeCall": _F,
    "rejectRealtimeCall": _F,
    "createRealtimeTranslationClientSecret": _G,
    "createRealtimeSession": _G,
    "createRealtimeTranscriptionSession": _G,
    # batches: usage arrives in an output file, out of relayd's sight
    "createBatch": _G,
    "listBatches": _F,
    "retrieveBatch": _F,
    "cancelBatch": _F,
    # stored objects: storage is billed by OpenAI per day, not per call
    **dict.fromkeys(
        (
            "createConversation",
            "getConversation",
            "updateConversation",
            "deleteConversation",
            "createConversationItems",
            "listConversationItems",
            "getConversationItem",
            "deleteConversationItem",
            "listFiles",
            "createFile",
            "retrieveFile",
            "deleteFile",
            "downloadFile",
            "createUpload",
            "addUploadPart",
            "completeUpload",
            "cancelUpload",
            "listVectorStores",
            "createVectorStore",
            "getVectorStore",
            "modifyVectorStore",
            "deleteVectorStore",
            "searchVectorStore",
            "listVectorStoreFiles",
            "createVectorStoreFile",
            "getVectorStoreFile",
            "updateVectorStoreFileAttributes",
            "deleteVectorStoreFile",
            "retrieveVectorStoreFileContent",
            "createVectorStoreFileBatch",
            "getVectorStoreFileBatch",
            "cancelVectorStoreFileBatch",
            "listFilesInVectorStoreBatch",
            "listContainers",
            "createContainer",
            "retrieveContainer",
            "deleteContainer",
            "createContainerFile",
            "listContainerFiles",
            "retrieveContainerFile",
            "deleteContainerFile",
            "retrieveContainerFileContent",
            "listModels",
            "retrieveModel",
            "deleteModel",
        ),
        _F,
    ),
}


def cost_of(operation_id: str | None, method: str) -> Cost:
    """How an upstream call is metered. A path outside the table (the catch-all lets
    the operator's policy pass it) is metered by its usage when it is a POST: an
    unknown endpoint that costs money is counted, never silently free."""
    if operation_id is not None:
        return COSTS.get(operation_id, Cost.FREE)
    return Cost.TOKENS if method == "POST" else Cost.FREE
