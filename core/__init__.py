"""The ground floor every app builds on: ownership, errors, settings from the environment, queue
names, downloads, form and admin helpers, and the ms-swift boundary (:mod:`core.swift_cli`). No
models, and no import of any app."""
