terraform {
  # terraform_data (1.4), optional object attributes (1.3) and a validation that names
  # another variable (1.9). No providers: only builtin resources and local-exec.
  required_version = ">= 1.9"
}
