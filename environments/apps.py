from django.apps import AppConfig


class EnvironmentsConfig(AppConfig):
    name = "environments"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from environments import permissions

        # A profile's host-network right taken away re-checks live terminals at once.
        permissions.connect_signals()
