// Makes the secure broker's ACLs exactly those of an ACL file: creates the missing ones and deletes
// every other ACL, in one JVM (one Admin connection) instead of one kafka-acls.sh start per line.
// Run by scripts/stack.sh as a single-file source program (java -cp 'libs/*' SetAcls.java ...).
//
// Usage: SetAcls ADMIN_PROPERTIES ACL_FILE
// ACL file: one ALLOW ACL per line, "PRINCIPAL RESOURCE_TYPE PATTERN_TYPE NAME OPERATION"
// (Kafka's enum names, e.g. "edgelog-loader GROUP LITERAL edgelog-loader READ"); # comments.
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.*;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.*;
import org.apache.kafka.common.resource.*;

public class SetAcls {
    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: SetAcls ADMIN_PROPERTIES ACL_FILE");
            System.exit(2);
        }
        Properties props = new Properties();
        try (var in = Files.newInputStream(Path.of(args[0]))) {
            props.load(in);
        }
        Set<AclBinding> want = new LinkedHashSet<>();
        int lineNo = 0;
        for (String raw : Files.readAllLines(Path.of(args[1]))) {
            lineNo++;
            String line = raw.replaceAll("#.*", "").strip();
            if (line.isEmpty()) continue;
            String[] f = line.split("\\s+");
            if (f.length != 5) {
                throw new IllegalArgumentException(args[1] + ":" + lineNo + ": expected 5 fields: " + raw);
            }
            ResourceType type = ResourceType.valueOf(f[1]);
            PatternType pattern = PatternType.valueOf(f[2]);
            AclOperation op = AclOperation.valueOf(f[4]);
            want.add(new AclBinding(
                new ResourcePattern(type, f[3], pattern),
                new AccessControlEntry("User:" + f[0], "*", op, AclPermissionType.ALLOW)));
        }
        try (Admin admin = Admin.create(props)) {
            Collection<AclBinding> have = admin.describeAcls(AclBindingFilter.ANY).values().get();
            List<AclBindingFilter> stale = new ArrayList<>();
            for (AclBinding b : have) {
                if (!want.contains(b)) stale.add(b.toFilter());
            }
            if (!stale.isEmpty()) admin.deleteAcls(stale).all().get();
            admin.createAcls(want).all().get();
            System.out.printf("%d ACLs in place, %d others removed%n", want.size(), stale.size());
        }
    }
}
