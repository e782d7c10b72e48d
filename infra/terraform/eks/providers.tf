# No credentials here. The provider authenticates from the environment: AWS_PROFILE / SSO on a
# workstation, an assumed role (OIDC web identity) in CI.
provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}
