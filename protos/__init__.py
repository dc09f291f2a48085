"""The wire contract of Flotilla: message models, envelope, codec, routing names, state machine.

Importable with no broker and no KVM. Every message that crosses AMQP is a `Message` subclass
registered here by its `TYPE`; `protos.codec` turns them into msgpack envelopes and back.
"""

from protos.base import Message, message_types
from protos.codec import CONTENT_TYPE, DecodeError, Envelope, decode, encode, parse_body

__all__ = [
    "CONTENT_TYPE",
    "DecodeError",
    "Envelope",
    "Message",
    "decode",
    "encode",
    "message_types",
    "parse_body",
]
