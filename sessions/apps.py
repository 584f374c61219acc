from django.apps import AppConfig


class TerminalSessionsConfig(AppConfig):
    # The label cannot be "sessions": django.contrib.sessions owns it.
    name = "sessions"
    label = "terminals"
    verbose_name = "Terminal sessions"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from environments import activity
        from sessions import checks  # noqa: F401  (registers sessions.E001: node and the emulator bundle)
        from sessions import services  # also connects the environment_stopped receiver

        activity.register(services.SessionActivity())
        from environments.worker import Periodic, register_periodic

        register_periodic(Periodic("reap_lost_sessions", lambda: 2.0, services.reap_lost_sessions))
        from lsl_site import shutdown

        async def release_terminals() -> None:
            from sessions.consumers import graceful_shutdown

            await graceful_shutdown()

        shutdown.register(release_terminals)
