"""The route table: every route relayd serves, declared exactly once.

Order matters only for the router: specific paths come before the ``/v1/`` catch-all,
which is last. Operation ids follow OpenAI's published spec where one exists, so a
reader can look them up there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from marshmallow import Schema

from relayd.actions import answers, handouts, wrappers
from relayd.actions.proxy import proxy
from relayd.actions.schemas import (
    ActionAnswer,
    ActionResponseRequest,
    FilesAnswer,
    FileUploadRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
    ProxyRequest,
    UploadCompleteRequest,
    UploadCreateRequest,
    UploadPartRequest,
    VideoCreateRequest,
    VideoGenerationRequest,
    VideoRemixRequest,
)
from relayd.handlers import meta, realtime
from relayd.handlers.passthrough import (
    create_response_stream,
    download_file,
    forward,
    forward_by_policy,
)
from relayd.mcp.transport import refuse_method, serve_mcp
from relayd.oauth import endpoints as oauth
from relayd.oauth.documented import (
    AUTHORIZE_ANSWERS,
    METADATA_ANSWERS,
    REGISTER_ANSWERS,
    REVOKE_ANSWERS,
    TOKEN_ANSWERS,
)
from relayd.oauth.metadata import PROTECTED_GROUP, RESOURCE_METADATA, resource_metadata_path
from relayd.routing import Body, Exposure, Handler, Route, RouteTable

__all__ = ["TABLE", "build_table"]

# Every route constructor here takes the same five positional arguments, in the same
# order (group, method, path, operationId, summary); everything else is by keyword.


def _route(
    group: str,
    method: str,
    path: str,
    operation_id: str,
    summary: str,
    *,
    handler: Handler = forward,
    body: Body = Body.NONE,
    exposure: Exposure = Exposure.RELAY,
    description: str | None = None,
    consequential: bool | None = None,
    request_schema: type[Schema] | None = None,
    response_schema: type[Schema] | None = None,
    forwards_to: str | None = None,
    responses: Mapping[str, Any] | None = None,
) -> Route:
    if request_schema is not None:
        body = Body.JSON  # a wrapper's body is the JSON its schema validates
    return Route(
        method,
        path,
        handler,
        group,
        exposure,
        operation_id,
        summary,
        body,
        description=description,
        request_schema=request_schema,
        consequential=consequential,
        response_schema=response_schema,
        forwards_to=forwards_to,
        responses=responses,
    )


def _action(*declared: str, consequential: bool | None, **options: Any) -> Route:
    """A GPT Actions route: offered to the Actions document unless ``exposure`` says
    otherwise, and it must say whether ChatGPT asks the user before each call
    (``x-openai-isConsequential``)."""
    options.setdefault("exposure", Exposure.ACTIONS)
    return _route(*declared, consequential=consequential, **options)


PUBLIC, ACTIONS, INTERNAL = Exposure.PUBLIC, Exposure.ACTIONS, Exposure.INTERNAL

# The declarations keep one route to a few lines; `ruff format` would spread each
# argument over a line of its own.
# fmt: off
# Meta routes change nothing: those offered to Actions never need the user's
# confirmation (consequential=False).
_META = (
    _route("meta", "GET", "/", "getRoot", "Relay health (root)", handler=meta.health,
           exposure=PUBLIC),
    _route("meta", "GET", "/health", "getHealth", "Relay health", handler=meta.health,
           exposure=PUBLIC),
    _route("meta", "GET", "/v1/health", "getHealthV1", "Relay health", handler=meta.health,
           exposure=PUBLIC),
    _route("meta", "GET", "/actions/ping", "pingActions", "Check the relay answers",
           handler=meta.ping, exposure=ACTIONS, consequential=False),
    _route("meta", "GET", "/v1/actions/ping", "ping", "Check the relay answers", handler=meta.ping,
           exposure=ACTIONS, consequential=False),
    _route("meta", "GET", "/actions/relay_info", "getRelayInfoFlat",
           "Get the relay's name, version and upstream (flat)", handler=meta.relay_info_flat,
           exposure=ACTIONS, consequential=False),
    _route("meta", "GET", "/v1/actions/relay_info", "getRelayInfo",
           "Get the relay's name, version and upstream", handler=meta.relay_info, exposure=ACTIONS,
           consequential=False),
    _route("meta", "GET", "/manifest", "getManifest", "Every route relayd serves",
           handler=meta.manifest, exposure=PUBLIC),
    _route("meta", "GET", "/v1/manifest", "getManifestV1", "Every route relayd serves",
           handler=meta.manifest, exposure=Exposure.RELAY),
    _route("meta", "GET", "/v1/tools", "listTools", "List team tools", handler=meta.list_tools,
           exposure=Exposure.RELAY),
    _route("meta", "GET", "/v1/tools/{tool_id}", "getTool", "Get one team tool",
           handler=meta.get_tool, exposure=Exposure.RELAY),
    _route("meta", "GET", "/.well-known/ai-plugin.json", "getAiPlugin",
           "Plugin manifest for ChatGPT", handler=meta.ai_plugin, exposure=PUBLIC),
    _route("meta", "GET", "/openapi.json", "getOpenAPI", "This API's OpenAPI",
           handler=meta.openapi_full, exposure=PUBLIC),
    # Behind a relay key; a key scoped to "metrics" alone suits the Prometheus scraper.
    _route("metrics", "GET", "/metrics", "getMetrics", "Prometheus metrics", handler=meta.metrics,
           exposure=INTERNAL),
    _route("meta", "GET", "/openapi.actions.json", "getOpenAPIActions",
           "OpenAPI subset for GPT Actions", handler=meta.openapi_actions, exposure=PUBLIC),
)

_RESPONSES = (
    _route("responses", "POST", "/v1/responses", "createResponse", "Create a model response",
           body=Body.JSON),
    _route("responses", "POST", "/v1/responses:stream", "createResponseStream",
           "Create a model response, streamed as server-sent events",
           handler=create_response_stream, body=Body.JSON),
    _route("responses", "POST", "/v1/responses/input_tokens", "getInputTokenCounts",
           "Count input tokens", body=Body.JSON),
    _route("responses", "POST", "/v1/responses/compact", "compactConversation",
           "Compact a conversation", body=Body.JSON),
    _route("responses", "GET", "/v1/responses/{response_id}", "getResponse", "Get a response"),
    _route("responses", "DELETE", "/v1/responses/{response_id}", "deleteResponse",
           "Delete a response"),
    _route("responses", "POST", "/v1/responses/{response_id}/cancel", "cancelResponse",
           "Cancel a background response", body=Body.ANY),
    _route("responses", "GET", "/v1/responses/{response_id}/input_items", "listInputItems",
           "List a response's input items"),
)

_CONVERSATIONS = (
    _route("conversations", "POST", "/v1/conversations", "createConversation",
           "Create a conversation", body=Body.JSON),
    _route("conversations", "GET", "/v1/conversations/{conversation_id}", "getConversation",
           "Get a conversation"),
    _route("conversations", "POST", "/v1/conversations/{conversation_id}", "updateConversation",
           "Update a conversation", body=Body.JSON),
    _route("conversations", "DELETE", "/v1/conversations/{conversation_id}", "deleteConversation",
           "Delete a conversation"),
    _route("conversations", "POST", "/v1/conversations/{conversation_id}/items",
           "createConversationItems", "Add items to a conversation", body=Body.JSON),
    _route("conversations", "GET", "/v1/conversations/{conversation_id}/items",
           "listConversationItems", "List a conversation's items"),
    _route("conversations", "GET", "/v1/conversations/{conversation_id}/items/{item_id}",
           "getConversationItem", "Get a conversation item"),
    _route("conversations", "DELETE", "/v1/conversations/{conversation_id}/items/{item_id}",
           "deleteConversationItem", "Delete a conversation item"),
)

_FILES = (
    _route("files", "GET", "/v1/files", "listFiles", "List files"),
    _route("files", "POST", "/v1/files", "createFile", "Upload a file (multipart)",
           body=Body.MULTIPART),
    _route("files", "GET", "/v1/files/{file_id}", "retrieveFile", "Get a file's metadata"),
    _route("files", "DELETE", "/v1/files/{file_id}", "deleteFile", "Delete a file"),
    _route("files", "GET", "/v1/files/{file_id}/content", "downloadFile",
           "Download a file's content", handler=download_file),
)

_UPLOADS = (
    _route("uploads", "POST", "/v1/uploads", "createUpload", "Start a multi-part upload",
           body=Body.JSON),
    _route("uploads", "POST", "/v1/uploads/{upload_id}/parts", "addUploadPart",
           "Add a part to an upload (multipart)", body=Body.MULTIPART),
    _route("uploads", "POST", "/v1/uploads/{upload_id}/complete", "completeUpload",
           "Complete an upload", body=Body.JSON),
    _route("uploads", "POST", "/v1/uploads/{upload_id}/cancel", "cancelUpload", "Cancel an upload",
           body=Body.ANY),
)

_BATCHES = (
    _route("batches", "POST", "/v1/batches", "createBatch", "Create a batch", body=Body.JSON),
    _route("batches", "GET", "/v1/batches", "listBatches", "List batches"),
    _route("batches", "GET", "/v1/batches/{batch_id}", "retrieveBatch", "Get a batch"),
    _route("batches", "POST", "/v1/batches/{batch_id}/cancel", "cancelBatch", "Cancel a batch",
           body=Body.ANY),
)

_VS = "/v1/vector_stores/{vector_store_id}"
_VECTOR_STORES = (
    _route("vector_stores", "GET", "/v1/vector_stores", "listVectorStores", "List vector stores"),
    _route("vector_stores", "POST", "/v1/vector_stores", "createVectorStore",
           "Create a vector store", body=Body.JSON),
    _route("vector_stores", "GET", _VS, "getVectorStore", "Get a vector store"),
    _route("vector_stores", "POST", _VS, "modifyVectorStore", "Modify a vector store",
           body=Body.JSON),
    _route("vector_stores", "DELETE", _VS, "deleteVectorStore", "Delete a vector store"),
    _route("vector_stores", "POST", f"{_VS}/search", "searchVectorStore", "Search a vector store",
           body=Body.JSON),
    _route("vector_stores", "GET", f"{_VS}/files", "listVectorStoreFiles",
           "List a vector store's files"),
    _route("vector_stores", "POST", f"{_VS}/files", "createVectorStoreFile",
           "Add a file to a vector store", body=Body.JSON),
    _route("vector_stores", "GET", f"{_VS}/files/{{file_id}}", "getVectorStoreFile",
           "Get a vector store file"),
    _route("vector_stores", "POST", f"{_VS}/files/{{file_id}}", "updateVectorStoreFileAttributes",
           "Update a vector store file's attributes", body=Body.JSON),
    _route("vector_stores", "DELETE", f"{_VS}/files/{{file_id}}", "deleteVectorStoreFile",
           "Remove a file from a vector store"),
    _route("vector_stores", "GET", f"{_VS}/files/{{file_id}}/content",
           "retrieveVectorStoreFileContent", "Get a vector store file's parsed content"),
    _route("vector_stores", "POST", f"{_VS}/file_batches", "createVectorStoreFileBatch",
           "Add files to a vector store in a batch", body=Body.JSON),
    _route("vector_stores", "GET", f"{_VS}/file_batches/{{batch_id}}", "getVectorStoreFileBatch",
           "Get a vector store file batch"),
    _route("vector_stores", "POST", f"{_VS}/file_batches/{{batch_id}}/cancel",
           "cancelVectorStoreFileBatch", "Cancel a vector store file batch", body=Body.ANY),
    _route("vector_stores", "GET", f"{_VS}/file_batches/{{batch_id}}/files",
           "listFilesInVectorStoreBatch", "List the files of a vector store file batch"),
)

_CT = "/v1/containers/{container_id}"
_CONTAINERS = (
    _route("containers", "GET", "/v1/containers", "listContainers", "List containers"),
    _route("containers", "POST", "/v1/containers", "createContainer", "Create a container",
           body=Body.JSON),
    _route("containers", "GET", _CT, "retrieveContainer", "Get a container"),
    _route("containers", "DELETE", _CT, "deleteContainer", "Delete a container"),
    _route("containers", "POST", f"{_CT}/files", "createContainerFile", "Add a file to a container",
           body=Body.JSON_OR_MULTIPART),
    _route("containers", "GET", f"{_CT}/files", "listContainerFiles", "List a container's files"),
    _route("containers", "GET", f"{_CT}/files/{{file_id}}", "retrieveContainerFile",
           "Get a container file"),
    _route("containers", "DELETE", f"{_CT}/files/{{file_id}}", "deleteContainerFile",
           "Delete a container file"),
    _route("containers", "GET", f"{_CT}/files/{{file_id}}/content", "retrieveContainerFileContent",
           "Download a container file's content"),
)

_VIDEOS = (
    _route("videos", "POST", "/v1/videos", "createVideo", "Create a video",
           body=Body.JSON_OR_MULTIPART),
    _route("videos", "GET", "/v1/videos", "listVideos", "List videos"),
    _route("videos", "POST", "/v1/videos/edits", "createVideoEdit", "Edit a video",
           body=Body.JSON_OR_MULTIPART),
    _route("videos", "POST", "/v1/videos/extensions", "createVideoExtension", "Extend a video",
           body=Body.JSON_OR_MULTIPART),
    _route("videos", "POST", "/v1/videos/characters", "createVideoCharacter",
           "Create a video character (multipart)", body=Body.MULTIPART),
    _route("videos", "GET", "/v1/videos/characters/{character_id}", "getVideoCharacter",
           "Get a video character"),
    _route("videos", "GET", "/v1/videos/{video_id}", "getVideo", "Get a video"),
    _route("videos", "DELETE", "/v1/videos/{video_id}", "deleteVideo", "Delete a video"),
    _route("videos", "GET", "/v1/videos/{video_id}/content", "retrieveVideoContent",
           "Download a video, thumbnail or spritesheet"),
    _route("videos", "POST", "/v1/videos/{video_id}/remix", "createVideoRemix", "Remix a video",
           body=Body.JSON_OR_MULTIPART),
)

_IMAGES = (
    _route("images", "POST", "/v1/images/generations", "createImage", "Generate images",
           body=Body.JSON),
    _route("images", "POST", "/v1/images/edits", "createImageEdit", "Edit images",
           body=Body.JSON_OR_MULTIPART),
    _route("images", "POST", "/v1/images/variations", "createImageVariation",
           "Create image variations (multipart)", body=Body.MULTIPART),
)

_MODELS_AND_MORE = (
    _route("embeddings", "POST", "/v1/embeddings", "createEmbedding", "Create embeddings",
           body=Body.JSON),
    _route("models", "GET", "/v1/models", "listModels", "List models"),
    _route("models", "GET", "/v1/models/{model}", "retrieveModel", "Get a model"),
    _route("models", "DELETE", "/v1/models/{model}", "deleteModel", "Delete a fine-tuned model"),
    _route("chat", "POST", "/v1/chat/completions", "createChatCompletion",
           "Create a chat completion", body=Body.JSON),
    _route("chat", "GET", "/v1/chat/completions", "listChatCompletions",
           "List stored chat completions"),
    _route("chat", "GET", "/v1/chat/completions/{completion_id}", "getChatCompletion",
           "Get a stored chat completion"),
    _route("chat", "POST", "/v1/chat/completions/{completion_id}", "updateChatCompletion",
           "Update a stored chat completion", body=Body.JSON),
    _route("chat", "DELETE", "/v1/chat/completions/{completion_id}", "deleteChatCompletion",
           "Delete a stored chat completion"),
    _route("chat", "GET", "/v1/chat/completions/{completion_id}/messages",
           "getChatCompletionMessages", "List a stored chat completion's messages"),
    _route("moderations", "POST", "/v1/moderations", "createModeration", "Classify content",
           body=Body.JSON),
    _route("audio", "POST", "/v1/audio/speech", "createSpeech", "Generate speech", body=Body.JSON),
    _route("audio", "POST", "/v1/audio/transcriptions", "createTranscription",
           "Transcribe audio (multipart)", body=Body.MULTIPART),
    _route("audio", "POST", "/v1/audio/translations", "createTranslation",
           "Translate audio to English (multipart)", body=Body.MULTIPART),
)

_REALTIME = (
    # WebSocket upgrades: what the official SDKs dial, and the path clients written for
    # an earlier relay dial (docs/design.md#older-spellings).
    _route("realtime", "GET", "/v1/realtime", "connectRealtime",
           "Open a realtime WebSocket session", handler=realtime.bridge_realtime),
    _route("realtime", "GET", "/v1/realtime/ws", "connectRealtimeWs",
           "Open a realtime WebSocket session (older path)", handler=realtime.bridge_realtime),
    # REST: every handler applies the [realtime] policy (enabled, allowed models).
    _route("realtime", "POST", "/v1/realtime/client_secrets", "createRealtimeClientSecret",
           "Create an ephemeral realtime client secret", handler=realtime.create_client_secret,
           body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/calls", "createRealtimeCall",
           "Start a realtime call (SDP)", handler=realtime.create_call, body=Body.ANY),
    _route("realtime", "POST", "/v1/realtime/calls/{call_id}/accept", "acceptRealtimeCall",
           "Accept an incoming realtime call", handler=realtime.accept_call, body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/calls/{call_id}/hangup", "hangupRealtimeCall",
           "Hang up a realtime call", handler=realtime.forward_realtime, body=Body.ANY),
    _route("realtime", "POST", "/v1/realtime/calls/{call_id}/refer", "referRealtimeCall",
           "Transfer a realtime call", handler=realtime.forward_realtime, body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/calls/{call_id}/reject", "rejectRealtimeCall",
           "Reject an incoming realtime call", handler=realtime.forward_realtime,
           body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/translations/client_secrets",
           "createRealtimeTranslationClientSecret",
           "Create an ephemeral realtime translation secret", handler=realtime.forward_realtime,
           body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/sessions", "createRealtimeSession",
           "Create a realtime session (legacy; model checked, default filled in)",
           handler=realtime.create_session, body=Body.JSON),
    _route("realtime", "POST", "/v1/realtime/transcription_sessions",
           "createRealtimeTranscriptionSession",
           "Create a realtime transcription session (legacy)",
           handler=realtime.forward_realtime, body=Body.JSON),
)


# The ChatGPT Actions surface (docs/chatgpt.md#the-actions-document): JSON wrappers
# validated by their request_schema,
# answers that fit ChatGPT's limits, files handed back as openaiFileResponse.
# Consequential (ChatGPT asks the user every time): anything that stores, spends a
# lot, or reaches arbitrary endpoints; reading and making images do not.
_REFS = "Attach files in the chat; ChatGPT passes them as openaiFileIdRefs."
_ACTIONS_SURFACE = (
    _action("actions", "POST", "/v1/actions/responses", "createActionResponse",
            "Ask a model; get its answer or an id to poll",
            handler=answers.create_action_response,
            description="Runs a model on the input. Answers with output_text when the model "
                        "finishes in time; otherwise status is in_progress: call getActionResponse"
                        " with the id.",
            consequential=False, request_schema=ActionResponseRequest,
            response_schema=ActionAnswer),
    _action("actions", "POST", "/v1/actions/responses/stream", "streamActionResponse",
            "Ask a model; the answer streams as server-sent events",
            handler=answers.stream_action_response, exposure=Exposure.RELAY,
            description="For scripts and apps: GPT Actions cannot read a stream.",
            consequential=None, request_schema=ActionResponseRequest),
    _action("actions", "GET", "/v1/actions/responses/{response_id}", "getActionResponse",
            "Get the answer of a model that was still working",
            handler=answers.get_action_response,
            description="Waits a while for the model, then answers with output_text, or status "
                        "in_progress again: call it again after poll_after_s seconds.",
            consequential=False, response_schema=ActionAnswer),
    _action("actions", "POST", "/v1/actions/files/upload", "uploadFileAction",
            "Store a file in the team's OpenAI files", handler=wrappers.upload_file,
            description=f"Uploads one file (base64, or one attached file) with a purpose. {_REFS}",
            consequential=True, request_schema=FileUploadRequest),
    _action("actions", "GET", "/v1/actions/files/{file_id}/content", "getFileContentAction",
            "Fetch a stored file into the chat", handler=handouts.file_content_for_chatgpt,
            description="Returns the file (up to 10 MB) as openaiFileResponse. Files with purpose "
                        "user_data are never returned.",
            consequential=False,
            response_schema=FilesAnswer),
    _action("actions", "POST", "/v1/actions/uploads", "createUploadAction",
            "Start an upload of a large file in parts", handler=wrappers.forward_validated,
            consequential=True, request_schema=UploadCreateRequest, forwards_to="/v1/uploads"),
    _action("actions", "POST", "/v1/actions/uploads/{upload_id}/parts", "addUploadPartAction",
            "Add one base64 part to an upload", handler=wrappers.add_upload_part,
            consequential=True, request_schema=UploadPartRequest),
    _action("actions", "POST", "/v1/actions/uploads/{upload_id}/complete", "completeUploadAction",
            "Finish an upload: its parts, in order, become a file",
            handler=wrappers.forward_validated, consequential=True,
            request_schema=UploadCompleteRequest,
            forwards_to="/v1/uploads/{upload_id}/complete"),
    _action("actions", "POST", "/v1/actions/uploads/{upload_id}/cancel", "cancelUploadAction",
            "Cancel an upload", handler=wrappers.cancel_upload, body=Body.ANY,
            consequential=True),
    _action("actions", "POST", "/v1/actions/images/generations", "generateImageAction",
            "Make images from a prompt", handler=wrappers.generate_image,
            description="The images come back as openaiFileResponse.", consequential=False,
            request_schema=ImageGenerationRequest, response_schema=FilesAnswer),
    _action("actions", "POST", "/v1/actions/images/edits", "editImageAction",
            "Edit or combine images with a prompt", handler=wrappers.edit_image,
            description=f"{_REFS} Every attached file is an input image except the one mask_index "
                        "names. The results come back as openaiFileResponse.",
            consequential=False,
            request_schema=ImageEditRequest, response_schema=FilesAnswer),
    _action("actions", "POST", "/v1/actions/images/variations", "createImageVariationAction",
            "Make variations of one square PNG image (dall-e-2)",
            handler=wrappers.create_image_variation,
            description=f"{_REFS} The results come back as openaiFileResponse.",
            consequential=False, request_schema=ImageVariationRequest,
            response_schema=FilesAnswer),
    _action("actions", "POST", "/v1/actions/videos", "createVideoAction",
            "Start a video from a prompt (JSON)", handler=wrappers.forward_validated,
            consequential=True, request_schema=VideoCreateRequest, forwards_to="/v1/videos"),
    _action("actions", "POST", "/v1/actions/videos/generations", "generateVideoAction",
            "Start a video from a prompt and an optional reference image",
            handler=wrappers.generate_video,
            description=f"Checks model, size and seconds against the allowed sets. {_REFS} Poll "
                        "with getVideoContentAction.",
            consequential=True,
            request_schema=VideoGenerationRequest),
    _action("actions", "POST", "/v1/actions/videos/{video_id}/remix", "remixVideoAction",
            "Start a new video from a finished one and a prompt",
            handler=wrappers.forward_validated, consequential=True,
            request_schema=VideoRemixRequest, forwards_to="/v1/videos/{video_id}/remix"),
    _action("actions", "GET", "/v1/actions/videos/{video_id}/content", "getVideoContentAction",
            "Get a finished video as a download link",
            handler=handouts.video_content_for_chatgpt,
            description="Answers with the video's status; once completed, a short-lived link in "
                        "openaiFileResponse.",
            consequential=False, response_schema=FilesAnswer),
    _action("actions", "GET", "/v1/actions/downloads/{token}", "downloadHandout",
            "Download a file relayd handed out (signed, short-lived link)",
            handler=handouts.download, exposure=Exposure.SIGNED, consequential=None),
    _action("proxy", "POST", "/v1/proxy", "proxyRequest",
            "Call another OpenAI JSON endpoint (allowlisted)", handler=proxy,
            description="For endpoints without an operation here: method, path (such as "
                        "/v1/models) and query or body. Streaming, binary, multipart and admin "
                        "endpoints are refused.",
            consequential=True, request_schema=ProxyRequest),
    _action("meta", "GET", "/privacy", "getPrivacyPolicy", "The privacy policy of this relay",
            handler=meta.privacy, exposure=Exposure.PUBLIC, consequential=None),
)

# relayd as the OAuth 2.1 authorization server of its own relay keys, for ChatGPT
# apps (docs/security.md#oauth). Public: these are how a client gets a token at all.
_OAUTH = (
    _route("oauth", "GET", RESOURCE_METADATA, "getProtectedResourceMetadata",
           "OAuth protected resource metadata (RFC 9728)", handler=oauth.resource_metadata,
           exposure=PUBLIC, responses=METADATA_ANSWERS),
    _route("oauth", "GET", "/.well-known/oauth-authorization-server",
           "getAuthorizationServerMetadata", "OAuth authorization server metadata (RFC 8414)",
           handler=oauth.server_metadata, exposure=PUBLIC, responses=METADATA_ANSWERS),
    _route("oauth", "GET", "/.well-known/openid-configuration", "getOpenIdConfiguration",
           "The authorization server metadata, where OpenID clients look for it",
           handler=oauth.server_metadata, exposure=PUBLIC, responses=METADATA_ANSWERS),
    _route("oauth", "GET", "/oauth/authorize", "showOAuthAuthorize",
           "The login page: link an app with your relay key", handler=oauth.authorize_page,
           exposure=PUBLIC, responses=AUTHORIZE_ANSWERS),
    _route("oauth", "POST", "/oauth/authorize", "submitOAuthAuthorize",
           "The login form: a relay key for an authorization code",
           handler=oauth.authorize_submit, body=Body.FORM, exposure=PUBLIC,
           responses=AUTHORIZE_ANSWERS),
    _route("oauth", "POST", "/oauth/token", "createOAuthToken",
           "Exchange a code or refresh token for tokens", handler=oauth.token, body=Body.FORM,
           exposure=PUBLIC, responses=TOKEN_ANSWERS),
    _route("oauth", "POST", "/oauth/revoke", "revokeOAuthToken", "Revoke a token and its grant",
           handler=oauth.revoke, body=Body.FORM, exposure=PUBLIC,
           responses=REVOKE_ANSWERS),
    _route("oauth", "POST", "/oauth/register", "registerOAuthClient",
           "Register an OAuth client (RFC 7591)", handler=oauth.register, body=Body.JSON,
           exposure=PUBLIC, responses=REGISTER_ANSWERS),
)
# fmt: on


def _resource_metadata_routes(served: Sequence[Route]) -> tuple[Route, ...]:
    """The protected resource metadata of each route OAuth protects, at its
    path-inserted well-known URL (RFC 9728 §3.1): derived, never written twice."""
    return tuple(
        _route(
            "oauth",
            "GET",
            resource_metadata_path(route.path),
            f"getProtectedResourceMetadataFor{route.operation_id[:1].upper()}"
            f"{route.operation_id[1:]}",
            f"OAuth protected resource metadata of {route.path} (RFC 9728)",
            handler=oauth.resource_metadata,
            exposure=PUBLIC,
            responses=METADATA_ANSWERS,
        )
        for route in served
        if route.group == PROTECTED_GROUP and route.method == "POST"
    )


# fmt: off
# ChatGPT apps and IDE agents (docs/chatgpt.md#chatgpt-apps): MCP over Streamable HTTP,
# the Actions operations as tools. A JSON-RPC endpoint, not a REST operation: served,
# not documented. GET and DELETE answer 405 (no server stream, no sessions), after auth.
_MCP = (
    _route("mcp", "POST", "/mcp", "postMcp", "MCP Streamable HTTP (JSON-RPC)",
           handler=serve_mcp, body=Body.JSON, exposure=INTERNAL),
    _route("mcp", "GET", "/mcp", "getMcp", "MCP server stream (not offered: 405)",
           handler=refuse_method, exposure=INTERNAL),
    _route("mcp", "DELETE", "/mcp", "deleteMcp", "MCP session end (no sessions: 405)",
           handler=refuse_method, exposure=INTERNAL),
)

# Last: everything else under /v1/ is decided by the path policy (paths.py).
_CATCH_ALL = (
    _route("policy", "*", "/v1/{tail:.*}", "relayByPolicy",
           "Other upstream paths, as the path policy allows", handler=forward_by_policy,
           body=Body.ANY, exposure=INTERNAL),
)
# fmt: on


def build_table() -> RouteTable:
    served = (
        *_META,
        *_RESPONSES,
        *_CONVERSATIONS,
        *_FILES,
        *_UPLOADS,
        *_BATCHES,
        *_VECTOR_STORES,
        *_CONTAINERS,
        *_VIDEOS,
        *_IMAGES,
        *_MODELS_AND_MORE,
        *_REALTIME,
        *_ACTIONS_SURFACE,
        *_OAUTH,
        *_MCP,
    )
    return RouteTable((*served, *_resource_metadata_routes(served), *_CATCH_ALL))


TABLE = build_table()
