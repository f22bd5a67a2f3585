output "hosts" {
  description = "The leased hosts as a JSON list of {name, address, slots, user}."
  value = jsonencode([for r in terraform_data.lease : {
    name    = r.output.name
    address = r.output.address
    slots   = r.output.slots
    user    = r.output.user
  }])
}
