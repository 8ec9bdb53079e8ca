"""The serving runtime: everything between a request and the model library.

It admits work and runs it on one worker per device (:mod:`serving.scheduler`, shared between
clients by :mod:`serving.fair_queue`, priced by :mod:`serving.cost`), owns the models of a device
(:mod:`serving.engine`), carries one photo or many through decode → submit → wait → encode
(:mod:`serving.flow`), and decodes and encodes images (:mod:`serving.images`, on the device with
:mod:`serving.gpu_codec`, on fair-shared threads with :mod:`serving.codec_pool`).

:mod:`inference` below it is the synchronous model library; nothing here knows HTTP.
"""
