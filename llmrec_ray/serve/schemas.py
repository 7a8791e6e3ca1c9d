"""The HTTP API's request and response bodies (pydantic), and the text rules every request text obeys.

FastAPI takes these as typed route parameters, so /openapi.json defines each of them and a body that does not fit
is a 422 naming the field (`candidates[2].text`), through guard.py's one validation handler.
"""

import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

# --- text that may reach the model -------------------------------------------------------------------------
# Lone UTF-16 surrogates are valid JSON ("\ud800") but no encoder takes them (the tokenizer raised, and so would
# the JSON encoder of an error echoing them); noncharacters and control characters other than tab and newlines
# are what broken encoders produce, never item text.
_NONCHARACTERS = "".join(chr(plane * 0x10000 + 0xFFFE) + chr(plane * 0x10000 + 0xFFFF) for plane in range(17))
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef" + _NONCHARACTERS + "]")


def clean_text(value: str) -> str:
    """NFC-normalised `value`, or ValueError naming the first code point no text should hold."""
    bad = _BAD_CHARACTER.search(value)
    if bad:
        ch = bad.group()
        kind = ("a lone UTF-16 surrogate" if "\ud800" <= ch <= "\udfff"
                else "a control character" if unicodedata.category(ch) == "Cc" else "a Unicode noncharacter")
        raise ValueError(f"holds U+{ord(ch):04X} ({kind}) at character {bad.start()}; send valid Unicode text")
    return unicodedata.normalize("NFC", value)


Text = Annotated[str, AfterValidator(clean_text)]
Key = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(clean_text)]  # an item id or a genre


def _json_kind(value: Any) -> str:
    """The union branch a JSON value belongs to: one branch is validated, so an error names one clear problem."""
    if isinstance(value, (dict, BaseModel)):
        return "object"
    return "array" if isinstance(value, (list, tuple)) else "string"


def _entry_kind(value: Any) -> str:
    return "object" if isinstance(value, (dict, BaseModel)) else "string"


UNION_TAGS = {"object", "array", "string"}  # dropped from error locations: `candidates[2].text`, not `...2.object.text`


# --- requests ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("histroy") is a 422, never silently ignored


class HistoryItem(_Strict):
    """A past item of the user: a catalogue id or free text, with the rating if there was one."""
    item_id: Optional[Key] = None
    text: Optional[Text] = Field(None, description="free text (an item the catalogue lacks); at most serve.max_text_chars")
    rating: Optional[float] = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False,
                                    description="the user's rating; none: an implicit event")


class Candidate(_Strict):
    """An item to score: a catalogue id or free text."""
    item_id: Optional[Key] = None
    text: Optional[Text] = Field(None, description="free text (an item the catalogue lacks); at most serve.max_text_chars")


class GenrePool(_Strict):
    """Every catalogue item of one genre."""
    genre: Key


HistoryEntry = Annotated[Union[Annotated[HistoryItem, Tag("object")], Annotated[Key, Tag("string")]],
                         Discriminator(_entry_kind)]
CandidateEntry = Annotated[Union[Annotated[Candidate, Tag("object")], Annotated[Key, Tag("string")]],
                           Discriminator(_entry_kind)]
Pool = Annotated[Union[Annotated[Literal["all"], Tag("string")], Annotated[GenrePool, Tag("object")],
                       Annotated[list[Key], Tag("array")]], Discriminator(_json_kind)]


class ScoreRequest(_Strict):
    history: list[HistoryEntry] = Field(default_factory=list, description="most recent first: item ids or "
                                        "{item_id | text, rating}; at most serve.max_history")
    candidates: list[CandidateEntry] = Field(..., min_length=1, description="item ids or {item_id | text}; "
                                             "at most serve.max_candidates")


class RecommendRequest(_Strict):
    history: list[HistoryEntry] = Field(default_factory=list, description="most recent first: item ids or "
                                        "{item_id | text, rating}; at most serve.max_history")
    pool: Pool = Field("all", description='the items to rank: "all", {"genre": ...} or a list of item ids; '
                                          "at most serve.max_pool after excluding the history")
    k: int = Field(10, ge=1, description="items returned, best first; at most serve.max_pool")
    exclude_history: bool = True


@dataclass
class ScoreItem:
    """The Api's call to the Scorer (not an HTTP body): one request's resolved texts plus the ids the collaborative
    part reads."""
    candidate_texts: list[str]
    history_text: str
    candidate_ids: list[Optional[str]]  # None: free text, scored from text alone
    history_ids: list[Optional[str]]  # most recent first
    history_ratings: list[float]  # NaN: no rating (an implicit event)
    deadline: float = float("inf")  # time.time() after which nobody waits for the answer (serve.request_timeout_s)
    shortlist: Optional[int] = None  # /v1/recommend: score only the retrieval stage's best N of the candidates


# --- responses -----------------------------------------------------------------------------------------------
class Score(BaseModel):
    item_id: Optional[str] = None
    text: Optional[str] = None
    probability: float


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[Score]  # in request order; each names its candidate as the request did (item_id or text)


class Recommendation(BaseModel):
    item_id: str
    title: str
    probability: float


class RecommendResponse(BaseModel):
    model_version: str
    items: list[Recommendation]  # best first


class ErrorResponse(BaseModel):
    error: str


class LoadError(BaseModel):
    version: Optional[str]
    error: str  # the exception type and message, without server paths (the replica log has the full traceback)
    at: float


class ModelInfo(BaseModel):
    version: Optional[str] = Field(description="the version this replica serves")
    promoted_version: Optional[str] = Field(description="the version registry/promoted.json names, as last read")
    in_sync: bool
    reason: Optional[str] = Field(description="why the served version is not the promoted one (null when in sync)")
    pinned_version: Optional[str]
    lineage: list[str]
    loaded_at: Optional[float]
    promoted_checked_at: Optional[float]
    reloads: int
    failed_loads: int
    last_load_error: Optional[LoadError] = Field(description="the latest refused load; cleared by a successful one")
    catalog_version: Optional[str] = Field(description="the catalogue version item ids are resolved against (the "
                                           "ingress follows the store's newest every serve.poll_interval_s)")
    index_items: Optional[int] = Field(description="items in the served version's item index (null: no index)")
    table_items: Optional[int] = Field(default=None, description="items with a row in the served version's "
                                       "collaborative tables, catalogue items without events included (null: text only)")
    index_catalog_version: Optional[str] = Field(description="the catalogue version whose every item the served "
                                                 "version's index and tables hold (null: neither grows with the "
                                                 "catalogue, or not grown yet); items they lack are scored from text")


class Health(BaseModel):
    status: str
    version: str


# --- the documented error answers ------------------------------------------------------------------------------
_ERROR_DOCS = {
    400: "the body nests JSON deeper than serve.max_json_depth",
    401: "missing or wrong bearer token (only when the server sets one: serve.auth_token_env)",
    413: "the body is larger than serve.max_body_bytes",
    422: "invalid request, the field named (e.g. candidates[2].text): not JSON, an unknown field, a non-finite "
         "number, text holding an invalid code point, an unknown item id, or a per-request limit of the serve config",
    503: "no model loaded yet, or the scorer's queue is full (serve.max_queued_requests): retry after Retry-After",
    504: "no answer within serve.request_timeout_s",
}


def error_responses(*codes: int) -> dict:
    """`responses=` for a route: each error status with its {"error"} body and, where sent, its headers."""
    out: dict[int, dict] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": _ERROR_DOCS[code]}
        if code == 503:
            out[code]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                    "schema": {"type": "integer"}}}
        if code == 401:
            out[code]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out
