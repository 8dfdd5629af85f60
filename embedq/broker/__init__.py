"""Redis as broker and result backend, one module per job: where it is (``url``), TLS
(``tls``), clients (``client``), waiting for results (``results``) and the kombu transport
(``transport``)."""
