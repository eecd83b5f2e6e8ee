"""The HTTP scoring service: ``create_app(settings)`` (service.app) and ``serve()`` (service.main).

Configuration comes from ``VAEBM_*`` environment variables (service.settings).
"""
