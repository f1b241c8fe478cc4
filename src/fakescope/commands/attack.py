"""Placeholder: this command's CLI glue is being written."""

HANDLERS: dict = {}


def register(sub, kit) -> None:
    return None
