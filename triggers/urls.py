from django.urls import path

from triggers import views

app_name = "hooks"
urlpatterns = [
    path("<str:public_id>/", views.webhook_receive, name="receive"),
    # Without the slash too: CommonMiddleware would answer a POST there with a redirect,
    # which a Standard Webhooks sender counts as a failed delivery and does not follow.
    path("<str:public_id>", views.webhook_receive),
]
