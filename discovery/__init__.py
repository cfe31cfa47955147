"""Consul discovery: the async agent API client, registration, and health watches.

Never imports TensorFlow nor anything from ``service``: the client library uses the
watch, the server uses the registration.

- ``discovery.consul``: ``ConsulAddress``, build/parse functions, ``TreqTransport``, ``ConsulClient``
- ``discovery.registration``: ``RegistrationSpec``, ``ConsulRegistration``
- ``discovery.watch``: ``Backend``, ``Backends``, ``HealthWatch``, ``StaticBackends``
"""
