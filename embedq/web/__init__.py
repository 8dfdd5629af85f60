"""The HTTP layer under the API (:mod:`embedq.api`): its error responses (``errors``) and
what bounds a request before the API sees it, with the server that enforces it
(``limits``)."""
