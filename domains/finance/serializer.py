"""Finance records <-> `key: value, ...` text, in the column order of schema.SPEC."""
from factory.serializer import Serializer

from .schema import SPEC

SERIALIZER = Serializer(SPEC)
