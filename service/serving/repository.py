"""The model repository requests every front end offers (Triton's repository extension): the index, load and
unload, with model control's refusals (service/serving/control.py) turned into ServingErrors here, in one place."""

from __future__ import annotations

from .control import ControlError, ControlUnavailable, LoadRefused, UnknownModel, WrongMode
from .errors import ServingError, bad_request
from .state import ServerState

STATUS: dict[type[ControlError], int] = {WrongMode: 400, LoadRefused: 400, UnknownModel: 404,
                                         ControlUnavailable: 503}


def _serving_error(err: ControlError) -> ServingError:
    return ServingError(STATUS.get(type(err), 500), str(err))


def index(state: ServerState, ready_only: bool) -> list[dict]:
    """Every version in the repository, served or not, with its state and the reason it is not READY."""
    return state.control.index(ready_only=ready_only)


async def load(state: ServerState, name: str, parameters: list[str] = ()) -> None:
    """Load the model's versions as the repository holds them now: 400 under another model control mode, when
    versions are refused (naming each) or for load parameters (Triton's config and file overrides: `parameters`,
    their names); 404 for a model the repository does not hold, 503 when the change could not be made now."""
    if parameters:
        raise bad_request(f"load parameters are not supported (got {', '.join(sorted(parameters))}): put the "
                          f"version folder, manifest.json last, into the model repository, then load")
    state.require_ready()
    try:
        await state.control.load(name)
    except ControlError as err:
        raise _serving_error(err) from None


async def unload(state: ServerState, name: str) -> None:
    """Stop serving the model; its admitted requests finish first. Errors as load's."""
    state.require_ready()
    try:
        await state.control.unload(name)
    except ControlError as err:
        raise _serving_error(err) from None
