"""The one live path: how a change reaches every open page (docs/live.md).

* :mod:`core.live.publish`, the write side: :func:`~core.live.publish.publish` (``group``, JSON-ready
  ``payload``) is the only entry point. With Redis it sends through the channel layer after the
  surrounding transaction commits; with the embedded default it writes an outbox row in the
  caller's transaction, so the notice exists exactly when the data does.
* :mod:`core.live.hub`, the read side: one :class:`~core.live.hub.Hub` per web process joins each
  group once and fans messages out to the process's sockets in memory (without Redis it follows
  the outbox); it also caps the sockets per user and re-checks their accounts.
* :mod:`core.live.sockets`: :class:`~core.live.sockets.OriginCheck` and the socket bases
  (:class:`~core.live.sockets.LiveConsumer`, :class:`~core.live.sockets.StreamConsumer`,
  :class:`~core.live.sockets.SnapshotConsumer`): authorise, join, send what the page lacks, repair
  every loss from the database, rate-limit what the page asks for.
* :mod:`core.live.topics`: :class:`~core.live.topics.SharedSnapshot` and
  :class:`~core.live.topics.TopicConsumer`, a snapshot computed once per change for every socket of a
  process (the GPUs, the queue), offered with :func:`~core.live.topics.register_topic`.
* :mod:`core.live.wire`: what both sides share (the layer in use, the outbox model, the message
  type, JSON a browser accepts).

Names are imported from the module that defines them (this package re-exports nothing), so a test
that replaces a setting such as ``hub.FOLLOW_SECONDS`` replaces it where it is read. The package is
the ground floor: it imports no app (the outbox model is named by a string, like ``AUTH_USER_MODEL``).
"""
