"""Conversations: the turns of a thread, in order."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CallerDep, SessionDep
from service.api.errors import ERROR_RESPONSES, NotFound
from service.api.schemas import ConversationPublic, GenerationPublic
from service.db import crud

router = APIRouter(prefix="/v1/conversations", tags=["conversations"], responses=ERROR_RESPONSES)


@router.get("/{conversation_id}", response_model=ConversationPublic)
def read_conversation(
    conversation_id: str, caller: CallerDep, session: SessionDep
) -> ConversationPublic:
    """A conversation with its turns, oldest first."""
    conversation = crud.get_conversation(
        session, tenant_id=caller.tenant_id, conversation_id=conversation_id
    )
    if conversation is None:
        raise NotFound(f"conversation {conversation_id!r} not found", param="conversation_id")
    turns = crud.conversation_turns(session, conversation_id=conversation.id)
    return ConversationPublic(
        id=conversation.id,
        created_at=conversation.created_at,
        metadata=conversation.meta,
        turns=[GenerationPublic.from_row(turn) for turn in turns],
    )
